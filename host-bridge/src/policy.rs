//! Which services each guest may open (`--allow PATTERN=SERVICE[,SERVICE...]`).
//!
//! Without any rule every guest may open every service. With rules, a guest
//! may open a service only if a rule whose pattern matches the guest's name
//! lists it (`*` lists every service); rules add up. A guest that opens a
//! service it may not gets `REFUSE NOT_PERMITTED`, which says "this exists,
//! but not for you", unlike `UNKNOWN_SERVICE`.

use crate::discovery::glob_match;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule {
    /// Guest names this rule is for (`*` and `?` wildcards).
    pub guests: String,
    /// Services they may open; `*` for all.
    pub services: Vec<String>,
}

pub fn parse_allow(s: &str) -> Result<AllowRule, String> {
    let s = s.trim();
    let (guests, services) = s
        .split_once('=')
        .ok_or_else(|| format!("expected GUEST-PATTERN=SERVICE[,SERVICE...], got {s:?} (no '=')"))?;
    if guests.is_empty() {
        return Err(format!("no guest pattern in {s:?} (use * for every guest)"));
    }
    let services: Vec<String> = services
        .split(',')
        .map(|x| x.trim().to_owned())
        .filter(|x| !x.is_empty())
        .collect();
    if services.is_empty() {
        return Err(format!("no service in {s:?}"));
    }
    for x in &services {
        if x != "*" && vios_common::proto::frame::check_service_name(x.as_bytes()).is_err() {
            return Err(format!("{x:?} in {s:?} is not a service name"));
        }
    }
    Ok(AllowRule {
        guests: guests.to_owned(),
        services,
    })
}

/// Whether `guest` may open `service` under `rules`.
pub fn permitted(rules: &[AllowRule], guest: &str, service: &str) -> bool {
    rules.is_empty()
        || rules
            .iter()
            .any(|r| glob_match(&r.guests, guest) && r.services.iter().any(|x| x == "*" || x == service))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_add_up_and_no_rule_allows_everything() {
        let rules = vec![
            parse_allow("web-*=amqp").unwrap(),
            parse_allow("web-admin=amqp,mgmt").unwrap(),
            parse_allow("ops=*").unwrap(),
        ];
        assert!(permitted(&rules, "web-1", "amqp"));
        assert!(!permitted(&rules, "web-1", "mgmt"));
        assert!(permitted(&rules, "web-admin", "mgmt"));
        assert!(permitted(&rules, "ops", "anything"));
        assert!(!permitted(&rules, "other", "amqp"));
        assert!(permitted(&[], "other", "amqp"));
        assert!(parse_allow("vm1").unwrap_err().contains("no '='"));
        assert!(parse_allow("vm1=").unwrap_err().contains("no service"));
        assert!(parse_allow("vm1=a b").unwrap_err().contains("not a service name"));
    }
}
