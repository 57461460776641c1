//! A real upstream credential, held so it cannot leak through `Debug`, `Display` or logs.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use zeroize::Zeroizing;

/// An upstream credential. `Debug` prints `[redacted]`; the bytes are zeroized on drop.
/// The only way to read it is [`Secret::expose`], used once per request to build the
/// injected header.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Zeroizing::new(value.into()))
    }

    /// The credential itself. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// An upstream's credential as a running server holds it: a [`Secret`] that
/// `till credential rotate` (through the admin API's reload) or SIGHUP can swap without a
/// restart. Clones share the slot. A request takes one snapshot ([`Credential::current`])
/// and uses it for everything it does (inject, scrub), so a swap never mixes two values
/// in one request, and requests in flight finish with the value they started with.
#[derive(Clone)]
pub struct Credential(Arc<ArcSwap<Secret>>);

impl Credential {
    /// A slot holding `secret`.
    pub fn new(secret: Secret) -> Self {
        Credential(Arc::new(ArcSwap::from_pointee(secret)))
    }

    /// The value now (one snapshot per request).
    pub fn current(&self) -> Arc<Secret> {
        self.0.load_full()
    }

    /// Every later request uses `secret`.
    pub fn replace(&self, secret: Secret) {
        self.0.store(Arc::new(secret));
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&s)), "Some([redacted])");
        assert_eq!(s.expose(), "sk-live-123");
    }

    #[test]
    fn a_credential_swap_reaches_every_clone_but_not_a_snapshot() {
        let c = Credential::new(Secret::new("sk-old"));
        let held = c.clone();
        let in_flight = c.current();
        c.replace(Secret::new("sk-new"));
        assert_eq!(held.current().expose(), "sk-new");
        assert_eq!(in_flight.expose(), "sk-old");
        assert_eq!(format!("{c:?}"), "[redacted]");
    }
}
