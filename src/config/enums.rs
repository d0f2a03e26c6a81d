//! Enum settings read by their words (`log.format`, `worker.customer_access.isolation`): one
//! lenient reading for all of them, so each enum says only its words.

use serde::{Deserialize, Deserializer};

/// Reads one of `names`, ignoring case and surrounding white space as the machine always has;
/// an unknown name fails with serde's message, which lists the allowed ones. Returns the index
/// of the name, so an enum maps it to its variant.
pub(super) fn variant<'de, D: Deserializer<'de>>(d: D, names: &'static [&'static str]) -> Result<usize, D::Error> {
    let text = String::deserialize(d)?;
    let wanted = text.trim().to_ascii_lowercase();
    names
        .iter()
        .position(|n| *n == wanted)
        .ok_or_else(|| serde::de::Error::unknown_variant(&text, names))
}
