//! Fair shares of a limited room (descriptors on the host, stream slots on
//! the guest) between holders that come and go (guests, local users).
//!
//! A part is kept for a holder that may yet arrive: an eighth of the room,
//! or an equal share if that is less (`room / (holders + 1)`). Each holder
//! present is guaranteed an equal part of the rest. A holder may use more
//! while others do not need theirs, but never what the others (and the
//! newcomer) are still owed: past its part it takes a unit only if, after
//! it, every holder present could still reach its part and a newcomer would
//! find its own. So nobody can take the last unit someone else is entitled
//! to, and the first to arrive cannot lock out the second, while a lone
//! holder still has seven eighths of the room. Nothing is taken back: a
//! holder that borrowed keeps what it holds until it lets go; as it does,
//! what it frees goes to those owed.

use std::collections::HashMap;
use std::hash::Hash;

/// Why a unit was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareRefusal {
    /// Every unit of the room is held.
    Full { room: usize },
    /// The holder has its share, and the rest is owed to others.
    Share { share: usize, holders: usize },
}

#[derive(Debug)]
pub struct FairShare<K> {
    room: usize,
    held: HashMap<K, usize>,
    total: usize,
    /// What holders below their part, and one newcomer, are still owed.
    owed: usize,
    /// Whether a part is kept for a holder yet to come (if not, a lone holder
    /// may take everything).
    newcomers: bool,
}

/// The newcomer's part is at most this fraction of the room.
const NEWCOMER_DIVISOR: usize = 8;

impl<K: Hash + Eq + Clone> FairShare<K> {
    pub fn new(room: usize) -> FairShare<K> {
        FairShare::with_newcomers(room, true)
    }

    /// Keeping a part for a holder yet to come, or not.
    pub fn with_newcomers(room: usize, newcomers: bool) -> FairShare<K> {
        let mut s = FairShare {
            room,
            held: HashMap::new(),
            total: 0,
            owed: 0,
            newcomers,
        };
        s.recount();
        s
    }

    /// The part kept for a newcomer while `holders` are present.
    fn reserve(&self, holders: usize) -> usize {
        if self.newcomers {
            (self.room / (holders + 1)).min(self.room.div_ceil(NEWCOMER_DIVISOR))
        } else {
            0
        }
    }

    /// Each holder's guaranteed part while `holders` are present.
    fn share_of(&self, holders: usize) -> usize {
        (self.room - self.reserve(holders)) / holders.max(1)
    }

    /// Each holder's guaranteed part now.
    pub fn share(&self) -> usize {
        self.share_of(self.held.len())
    }

    fn recount(&mut self) {
        let f = self.share();
        self.owed =
            self.reserve(self.held.len()) + self.held.values().map(|&h| f.saturating_sub(h)).sum::<usize>();
    }

    /// `k` is present: from now on its part is guaranteed.
    pub fn join(&mut self, k: K) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.held.entry(k) {
            e.insert(0);
            self.recount();
        }
    }

    /// `k` is gone. What it still holds is freed with it.
    pub fn leave(&mut self, k: &K) {
        if let Some(h) = self.held.remove(k) {
            self.total -= h;
            self.recount();
        }
    }

    /// Takes one unit for `k` (present from now on).
    pub fn try_take(&mut self, k: &K) -> Result<(), ShareRefusal> {
        self.join(k.clone());
        if self.total >= self.room {
            return Err(ShareRefusal::Full { room: self.room });
        }
        let share = self.share();
        debug_assert!(self.owed <= self.room);
        let held = self.held[k];
        if held < share {
            // Drawn from what it is owed.
            self.owed -= 1;
        } else if self.room - self.total - 1 < self.owed {
            return Err(ShareRefusal::Share {
                share,
                holders: self.held.len(),
            });
        }
        *self.held.get_mut(k).expect("joined") += 1;
        self.total += 1;
        Ok(())
    }

    /// Whether [`FairShare::try_take`] would succeed for `k` now.
    pub fn may_take(&self, k: &K) -> bool {
        if self.total >= self.room {
            return false;
        }
        let (share, owed) = match self.held.get(k) {
            Some(_) => (self.share(), self.owed),
            // Joining makes the part smaller and adds what `k` is owed.
            None => {
                let holders = self.held.len() + 1;
                let s = self.share_of(holders);
                let owed = self.reserve(holders)
                    + s
                    + self.held.values().map(|&h| s.saturating_sub(h)).sum::<usize>();
                (s, owed)
            }
        };
        let held = self.held.get(k).copied().unwrap_or(0);
        held < share || self.room - self.total > owed
    }

    pub fn release(&mut self, k: &K) {
        let share = self.share();
        if let Some(h) = self.held.get_mut(k) {
            debug_assert!(*h > 0, "released more than held");
            *h -= 1;
            self.total -= 1;
            if *h < share {
                self.owed += 1;
            }
        }
    }

    /// A new room (say, the peer's stream limit changed). Nothing held is
    /// taken back; a smaller room only holds back new units.
    pub fn set_room(&mut self, room: usize) {
        self.room = room;
        self.recount();
    }

    pub fn held_by(&self, k: &K) -> usize {
        self.held.get(k).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn holders(&self) -> usize {
        self.held.len()
    }

    pub fn room(&self) -> usize {
        self.room
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_holder_cannot_lock_out_the_second() {
        let mut s = FairShare::new(100);
        // Alone, a holder gets seven eighths: 13 wait for a newcomer.
        let first = (0..100).filter(|_| s.try_take(&"a").is_ok()).count();
        assert_eq!(first, 87);
        assert_eq!(
            s.try_take(&"a"),
            Err(ShareRefusal::Share {
                share: 87,
                holders: 1
            })
        );
        // The newcomer finds the part kept for it at once ...
        let second = (0..100).filter(|_| s.try_take(&"b").is_ok()).count();
        assert_eq!(second, 13);
        assert_eq!(s.try_take(&"b"), Err(ShareRefusal::Full { room: 100 }));
        // ... and what the first lets go, up to its own part (43).
        for _ in 0..40 {
            s.release(&"a");
        }
        assert_eq!((0..100).filter(|_| s.try_take(&"b").is_ok()).count(), 30);
        assert!(!s.may_take(&"a"), "a is past its part while b is owed");
    }

    #[test]
    fn idle_parts_are_lent_but_what_is_owed_is_not() {
        let mut s = FairShare::new(100);
        for k in 1..=4 {
            s.join(k);
        }
        // 13 kept for a newcomer, parts of 21 for the four present; holder 1
        // may use its own and the 3 left over, nothing the others and the
        // newcomer are owed.
        assert_eq!((0..100).filter(|_| s.try_take(&1).is_ok()).count(), 24);
        for k in 2..=4 {
            assert_eq!((0..100).filter(|_| s.try_take(&k).is_ok()).count(), 21);
        }
        // The newcomer's part was kept for it: it finds its 13.
        assert_eq!((0..100).filter(|_| s.try_take(&5).is_ok()).count(), 13);
        assert_eq!(s.try_take(&5), Err(ShareRefusal::Full { room: 100 }));
        // Holders that leave give their parts to the rest.
        for _ in 0..21 {
            s.release(&4);
        }
        s.leave(&4);
        assert_eq!(s.total(), 79);
        // Holder 5 is owed 8 of its 21, the next newcomer 13: holder 1, past
        // its part, may not borrow the 21 that are free.
        assert!(s.may_take(&5) && !s.may_take(&1));
    }

    #[test]
    fn without_a_newcomers_part_a_lone_holder_takes_all() {
        let mut s = FairShare::with_newcomers(10, false);
        assert_eq!((0..20).filter(|_| s.try_take(&0).is_ok()).count(), 10);
    }

    #[test]
    fn may_take_agrees_with_try_take() {
        let mut s = FairShare::with_newcomers(37, true);
        let mut rng = 12345u64;
        for _ in 0..5000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let k = rng % 5;
            match rng % 3 {
                0 | 1 => {
                    let predicted = s.may_take(&k);
                    assert_eq!(s.try_take(&k).is_ok(), predicted, "{s:?} {k}");
                }
                _ => {
                    if s.held_by(&k) > 0 {
                        s.release(&k);
                    } else if rng % 7 == 0 {
                        s.leave(&k);
                    }
                }
            }
            let f = s.share();
            let owed = s.reserve(s.held.len()) + s.held.values().map(|&h| f.saturating_sub(h)).sum::<usize>();
            assert_eq!(s.owed, owed, "owed drifted");
            assert!(s.total <= s.room);
        }
    }
}
