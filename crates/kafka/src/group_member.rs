//! Which topics a classic consumer-group member subscribed to, read from
//! the member metadata DescribeGroups returns (the consumer protocol's
//! `ConsumerProtocolSubscription`: every version starts with the version
//! and the topic names). Every member declares its subscription, idle or
//! not, where its assignment would be empty when it got no partition.
//!
//! The bytes come from the broker and, through it, from every member of
//! the group: every count and length is checked against what is left
//! before anything is read, nothing is allocated, and any malformed input
//! reads as `None`.

/// What a member's subscription says of one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    /// The topic is among the member's topics.
    To,
    /// The member subscribed to other topics only.
    Elsewhere,
    /// The subscription names no topic.
    Nothing,
}

/// Whether the member whose metadata this is subscribed to `topic`;
/// `None` when the bytes are not a consumer-protocol subscription.
pub fn subscription_to(metadata: &[u8], topic: &str) -> Option<Subscribed> {
    let mut r = Reader(metadata);
    if r.i16()? < 0 {
        return None;
    }
    let count = r.count(2)?;
    let mut named = false;
    for _ in 0..count {
        named |= r.string()? == topic.as_bytes();
    }
    Some(match (named, count) {
        (true, _) => Subscribed::To,
        (false, 0) => Subscribed::Nothing,
        (false, _) => Subscribed::Elsewhere,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An array's element count, refused when even elements of
    /// `min_size` bytes each could not fit in what is left.
    fn count(&mut self, min_size: usize) -> Option<usize> {
        let n = usize::try_from(self.i32()?).ok()?;
        (n.checked_mul(min_size)? <= self.0.len()).then_some(n)
    }

    /// A non-null string's bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.i16()?).ok()?;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Kafka's `ConsumerProtocol.serializeSubscription` writes (the
    /// fields after the topics, which later versions add, included).
    fn subscription(version: i16, topics: &[&str]) -> Vec<u8> {
        let mut b = version.to_be_bytes().to_vec();
        b.extend((topics.len() as i32).to_be_bytes());
        for topic in topics {
            b.extend((topic.len() as i16).to_be_bytes());
            b.extend(topic.as_bytes());
        }
        b.extend((-1i32).to_be_bytes()); // user data: null
        if version >= 1 {
            b.extend(0i32.to_be_bytes()); // owned partitions: none
        }
        if version >= 2 {
            b.extend((-1i32).to_be_bytes()); // generation
        }
        if version >= 3 {
            b.extend((-1i16).to_be_bytes()); // rack: null
        }
        b
    }

    #[test]
    fn subscriptions_of_every_version_and_nothing_from_garbage() {
        for version in 0..=3 {
            let b = subscription(version, &["orders", "audit"]);
            assert_eq!(subscription_to(&b, "audit"), Some(Subscribed::To));
            assert_eq!(subscription_to(&b, "other"), Some(Subscribed::Elsewhere));
        }
        assert_eq!(
            subscription_to(&subscription(1, &[]), "a"),
            Some(Subscribed::Nothing)
        );
        // Cut anywhere within the topics: refused.
        let good = subscription(0, &["orders", "eu"]);
        for cut in 0..(2 + 4 + 2 + 6 + 2 + 2) {
            assert_eq!(subscription_to(&good[..cut], "eu"), None, "cut at {cut}");
        }
        assert_eq!(subscription_to(&[], "a"), None);
        assert_eq!(
            subscription_to(&[0xff, 0xff, 0, 0, 0, 0], "a"),
            None,
            "negative version"
        );
        // A count claiming 2^31-1 topics in a few bytes: refused at once.
        assert_eq!(
            subscription_to(&[0, 0, 0x7f, 0xff, 0xff, 0xff, 0, 0], "a"),
            None
        );
        // A null topic name (-1): refused.
        assert_eq!(subscription_to(&[0, 0, 0, 0, 0, 1, 0xff, 0xff], "a"), None);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(
                std::env::var("MICROBATCH_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
            ))]

            /// Any bytes: an answer or nothing, never a panic; "subscribed"
            /// only when the name is in the bytes.
            #[test]
            fn any_bytes_read_as_an_answer_or_nothing(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                if subscription_to(&bytes, "ab") == Some(Subscribed::To) {
                    prop_assert!(bytes.windows(2).any(|w| w == b"ab"));
                }
            }

            /// A real subscription with one byte changed.
            #[test]
            fn damaged_subscriptions_never_panic(at in 0usize..64, to in any::<u8>()) {
                let mut b = subscription(3, &["events", "t"]);
                let i = at % b.len();
                b[i] = to;
                let _ = subscription_to(&b, "t");
            }
        }
    }
}
