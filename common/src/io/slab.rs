//! A minimal slab: stable `usize` keys for connections, reused after removal,
//! so a key can be a mio token.

#[derive(Debug)]
pub struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    pub fn insert(&mut self, value: T) -> usize {
        self.len += 1;
        if let Some(key) = self.free.pop() {
            self.entries[key] = Some(value);
            key
        } else {
            self.entries.push(Some(value));
            self.entries.len() - 1
        }
    }

    /// The key the next [`Slab::insert`] will use.
    pub fn next_key(&self) -> usize {
        self.free.last().copied().unwrap_or(self.entries.len())
    }

    /// Inserts the value `f` builds from its key, unless `f` fails.
    pub fn insert_with<E>(&mut self, f: impl FnOnce(usize) -> (T, Result<(), E>)) -> Result<usize, E> {
        let key = self.next_key();
        let (value, r) = f(key);
        r?;
        let got = self.insert(value);
        debug_assert_eq!(got, key);
        Ok(key)
    }

    pub fn remove(&mut self, key: usize) -> Option<T> {
        let v = self.entries.get_mut(key)?.take()?;
        self.free.push(key);
        self.len -= 1;
        Some(v)
    }

    pub fn get(&self, key: usize) -> Option<&T> {
        self.entries.get(key)?.as_ref()
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        self.entries.get_mut(key)?.as_mut()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn keys(&self) -> impl Iterator<Item = usize> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(k, v)| v.as_ref().map(|_| k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_reused() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None);
        assert_eq!(s.insert("c"), a);
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.len(), 2);
        assert_eq!(s.keys().collect::<Vec<_>>(), vec![0, 1]);
    }
}
