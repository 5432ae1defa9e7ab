//! Channel patterns for namespace subscriptions (`meeting:*/commands`).
//!
//! A pattern is a channel name in which `*` stands for one or more characters other
//! than `/`: `meeting:*/commands` matches `meeting:42/commands`, not
//! `meeting:42/x/commands` nor `meeting:/commands`. It holds at least one `*`; the rest
//! follows the channel name rules ([`ChannelName`]).

use std::fmt;

use crate::ids::{ChannelName, MAX_CHANNEL_LEN};

/// A validated channel pattern.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ChannelPattern {
    text: String,
    /// The literal parts between the `*`s (the first and last may be empty).
    parts: Vec<String>,
}

/// Why a string is not a valid channel pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("a pattern needs at least one '*' (subscribe to a single channel by name)")]
    NoWildcard,
    #[error("pattern is {0} bytes long; the limit is {MAX_CHANNEL_LEN}")]
    TooLong(usize),
    #[error("pattern contains {0:?}; allowed are '*' and the characters of channel names")]
    BadChar(char),
    #[error("'**' is not a pattern: '*' already stands for one or more characters")]
    DoubleStar,
}

impl ChannelPattern {
    pub fn new(text: &str) -> Result<Self, PatternError> {
        if text.len() > MAX_CHANNEL_LEN {
            return Err(PatternError::TooLong(text.len()));
        }
        if !text.contains('*') {
            return Err(PatternError::NoWildcard);
        }
        if text.contains("**") {
            return Err(PatternError::DoubleStar);
        }
        if let Some(c) = text
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_-.:/@=*".contains(*c)))
        {
            return Err(PatternError::BadChar(c));
        }
        Ok(Self {
            text: text.to_owned(),
            parts: text.split('*').map(str::to_owned).collect(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The literal text before the first `*`: every matching name starts with it.
    pub fn prefix(&self) -> &str {
        &self.parts[0]
    }

    pub fn matches(&self, channel: &ChannelName) -> bool {
        let mut rest = channel.as_str();
        let Some((first, wild)) = self.parts.split_first() else {
            return false;
        };
        let Some(r) = rest.strip_prefix(first.as_str()) else {
            return false;
        };
        rest = r;
        // Each `*` takes the shortest run (1+ chars, no '/') after which the next
        // literal follows; the last literal must end the name. Literals between stars
        // either contain '/' (then the run ends at the first '/') or not; either way
        // the shortest run that lets the literal match is the only candidate that
        // keeps later parts free, except for the last literal, matched at the end.
        for (i, lit) in wild.iter().enumerate() {
            let last = i + 1 == wild.len();
            let run_max = rest.find('/').unwrap_or(rest.len());
            if last {
                // The run is everything up to where the final literal must start.
                let Some(start) = rest.len().checked_sub(lit.len()) else {
                    return false;
                };
                return start >= 1 && start <= run_max && rest[start..] == **lit;
            }
            let mut found = None;
            for start in 1..=run_max {
                if rest[start..].starts_with(lit.as_str()) {
                    found = Some(start + lit.len());
                    break;
                }
            }
            match found {
                Some(end) => rest = &rest[end..],
                None => return false,
            }
        }
        false
    }
}

impl fmt::Display for ChannelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn p(s: &str) -> ChannelPattern {
        ChannelPattern::new(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn a_star_is_one_or_more_characters_within_a_segment() {
        let m = p("meeting:*/commands");
        assert_eq!(m.prefix(), "meeting:");
        assert!(m.matches(&c("meeting:42/commands")));
        assert!(m.matches(&c("meeting:a-b.c/commands")));
        assert!(!m.matches(&c("meeting:42/x/commands")));
        assert!(!m.matches(&c("meeting:42/commandsx")));
        assert!(!m.matches(&c("meeting:42")));
        assert!(!m.matches(&c("other:42/commands")));
        let all = p("job:*");
        assert!(all.matches(&c("job:1")));
        assert!(!all.matches(&c("job:1/log")));
        let two = p("p:*/run.*");
        assert!(two.matches(&c("p:1/run.7")));
        assert!(!two.matches(&c("p:1/run.")));
        assert!(!two.matches(&c("p:1/2/run.7")));
        let mid = p("a*b*c");
        assert!(mid.matches(&c("axbyc")));
        assert!(mid.matches(&c("abbbc")));
        assert!(!mid.matches(&c("abc")));
        let lead = p("*/commands");
        assert!(lead.matches(&c("room/commands")));
        assert_eq!(lead.prefix(), "");
    }

    #[test]
    fn bad_patterns_say_why() {
        assert_eq!(
            ChannelPattern::new("meeting:1"),
            Err(PatternError::NoWildcard)
        );
        assert_eq!(ChannelPattern::new("a**"), Err(PatternError::DoubleStar));
        assert_eq!(ChannelPattern::new("a *"), Err(PatternError::BadChar(' ')));
        assert!(matches!(
            ChannelPattern::new(&format!("{}*", "a".repeat(200))),
            Err(PatternError::TooLong(_))
        ));
    }

    proptest::proptest! {
        /// Agrees with a plain backtracking matcher on names built from few letters.
        #[test]
        fn agrees_with_backtracking(pat in "[ab/*]{1,8}", name in "[ab/]{1,10}") {
            let (Ok(pat), Ok(name)) = (ChannelPattern::new(&pat), ChannelName::new(name)) else {
                return Ok(());
            };
            fn bt(p: &[u8], s: &[u8]) -> bool {
                match p.split_first() {
                    None => s.is_empty(),
                    Some((b'*', rest)) => (1..=s.len())
                        .take_while(|&n| s[n - 1] != b'/')
                        .any(|n| bt(rest, &s[n..])),
                    Some((c, rest)) => s.first() == Some(c) && bt(rest, &s[1..]),
                }
            }
            proptest::prop_assert_eq!(pat.matches(&name), bt(pat.as_str().as_bytes(), name.as_str().as_bytes()));
        }
    }
}
