//! The status words the library's lifecycle and cancel functions answer, read in one place.
//!
//! The Lua side answers a plain string (`ok`, `held`, `retried`, `failed`, `cancelled`, `lost`,
//! `already_completed`, `not_found`, `already_<status>`); every caller matches on [`Reply`]
//! instead of on those strings, so a word the library starts to answer fails here, loudly, as
//! a protocol error rather than passing for success somewhere else.

use super::super::BrokerError;

/// What a lifecycle or cancel function of the library answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reply {
    /// The write was made (`ok`).
    Ok,
    /// The lease was extended (`held`).
    Held,
    /// The failed job went back to the queue (`retried`).
    Retried,
    /// The job failed for good (`failed`).
    Failed,
    /// The job was cancelled: by the API before a fenced write, or by this cancel (`cancelled`).
    Cancelled,
    /// The job is no longer the writing worker's (`lost`).
    Lost,
    /// No such job (`not_found`).
    NotFound,
    /// The job had already ended with this status (`already_<status>`); a completion repeated
    /// after a lost reply answers `already_completed`.
    AlreadyEnded(String),
}

impl Reply {
    /// Reads the word `function` answered.
    pub(super) fn parse(function: &'static str, word: &str) -> Result<Reply, BrokerError> {
        Ok(match word {
            "ok" => Reply::Ok,
            "held" => Reply::Held,
            "retried" => Reply::Retried,
            "failed" => Reply::Failed,
            "cancelled" => Reply::Cancelled,
            "lost" => Reply::Lost,
            "not_found" => Reply::NotFound,
            other => match other.strip_prefix("already_") {
                Some(status) if !status.is_empty() => Reply::AlreadyEnded(status.to_owned()),
                _ => {
                    return Err(BrokerError::Protocol {
                        op: function,
                        detail: format!("unexpected reply `{other}`"),
                    });
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_of_the_library_reads() {
        for (word, reply) in [
            ("ok", Reply::Ok),
            ("held", Reply::Held),
            ("retried", Reply::Retried),
            ("failed", Reply::Failed),
            ("cancelled", Reply::Cancelled),
            ("lost", Reply::Lost),
            ("not_found", Reply::NotFound),
            ("already_completed", Reply::AlreadyEnded("completed".to_owned())),
            ("already_unworkable", Reply::AlreadyEnded("unworkable".to_owned())),
        ] {
            assert_eq!(Reply::parse("failJob", word).expect(word), reply);
        }
    }

    #[test]
    fn an_unknown_word_is_a_protocol_error() {
        for word in ["", "OK", "already_", "indexed"] {
            assert!(
                matches!(
                    Reply::parse("startJob", word),
                    Err(BrokerError::Protocol { op: "startJob", .. })
                ),
                "{word:?}"
            );
        }
    }
}
