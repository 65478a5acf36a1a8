//! Named rules a job can break. Every check that refuses a job before any
//! work (the job spec, a strategy's layout, the launch) reports a
//! [`Violation`] naming its rule, so a user can look the rule up in the
//! README's list.
//!
//! A leaf module: it depends on nothing else in the crate.

/// A broken rule and what broke it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rule `{rule}` broken: {detail}")]
pub struct Violation {
    /// The rule's name, e.g. `heads-divisible-by-tp`.
    pub rule: &'static str,
    /// What broke it, with the numbers.
    pub detail: String,
}

/// A violation of `rule`.
pub fn violation(rule: &'static str, detail: impl Into<String>) -> Violation {
    Violation { rule, detail: detail.into() }
}

/// `Err` of `rule` unless `ok`.
pub fn ensure(ok: bool, rule: &'static str, detail: impl FnOnce() -> String) -> Result<(), Violation> {
    if ok {
        Ok(())
    } else {
        Err(violation(rule, detail()))
    }
}
