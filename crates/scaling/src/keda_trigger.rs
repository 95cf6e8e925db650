//! KEDA's kafka trigger options: what KEDA v2.21 accepts, read into
//! [`KedaParams`].
//!
//! One place for the rules, so `microbatch lag`/`supervise` flags and the
//! external scaler's trigger metadata refuse the same things KEDA refuses:
//! - `lagThreshold` must be positive, `activationLagThreshold` not negative;
//! - `allowIdleConsumers` and `limitToPartitionsWithLag` exclude each other,
//!   as do `limitToPartitionsWithLag` and `ensureEvenDistributionOfPartitions`;
//! - `limitToPartitionsWithLag` and `ensureEvenDistributionOfPartitions`
//!   need a topic;
//! - `partitionLimitation` is a list of ids and inclusive ranges (`0,2,4-6`),
//!   ignored without a topic.

use std::collections::HashMap;

use thiserror::Error;

use crate::lag::GroupLag;
use crate::policy::KedaParams;

/// A trigger option KEDA would refuse, named by its metadata key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{key}: {rule}")]
pub struct TriggerError {
    /// The metadata key, as in a ScaledObject (`lagThreshold`, ...).
    pub key: &'static str,
    pub rule: String,
}

impl TriggerError {
    fn new(key: &'static str, rule: impl Into<String>) -> Self {
        Self {
            key,
            rule: rule.into(),
        }
    }
}

/// Checks the combinations KEDA rejects; `has_topic` is whether the trigger
/// names a topic.
pub fn validate(params: &KedaParams, has_topic: bool) -> Result<(), TriggerError> {
    if params.lag_threshold <= 0 {
        return Err(TriggerError::new(
            "lagThreshold",
            "must be a positive number",
        ));
    }
    if params.activation_lag_threshold < 0 {
        return Err(TriggerError::new(
            "activationLagThreshold",
            "must be a non-negative number",
        ));
    }
    if params.allow_idle_consumers && params.limit_to_partitions_with_lag {
        return Err(TriggerError::new(
            "limitToPartitionsWithLag",
            "cannot be set together with allowIdleConsumers",
        ));
    }
    if params.limit_to_partitions_with_lag && params.ensure_even_distribution_of_partitions {
        return Err(TriggerError::new(
            "ensureEvenDistributionOfPartitions",
            "cannot be set together with limitToPartitionsWithLag",
        ));
    }
    if !has_topic && params.limit_to_partitions_with_lag {
        return Err(TriggerError::new(
            "limitToPartitionsWithLag",
            "needs a topic",
        ));
    }
    if !has_topic && params.ensure_even_distribution_of_partitions {
        return Err(TriggerError::new(
            "ensureEvenDistributionOfPartitions",
            "needs a topic",
        ));
    }
    Ok(())
}

/// KEDA fails a reading whose `partitionLimitation` leaves none of the
/// topic's partitions.
pub fn check_partitions(params: &KedaParams, lag: &GroupLag) -> Result<(), TriggerError> {
    match &params.partition_limitation {
        Some(only) if !lag.partitions.iter().any(|p| only.contains(&p.partition)) => {
            Err(TriggerError::new(
                "partitionLimitation",
                format!("lists none of the partitions of {}", lag.topic),
            ))
        }
        _ => Ok(()),
    }
}

/// Parses `partitionLimitation`: ids and inclusive ranges, comma-separated.
pub fn parse_partition_limitation(text: &str) -> Result<Vec<i32>, TriggerError> {
    let bad = |part: &str| {
        TriggerError::new(
            "partitionLimitation",
            format!("{part:?} is not a partition id or a range like 4-6"),
        )
    };
    let id = |s: &str, part: &str| s.trim().parse::<i32>().map_err(|_| bad(part));
    let mut ids = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.contains('-') {
            let Some((start, end)) = part.split_once('-').filter(|(_, e)| !e.contains('-')) else {
                return Err(bad(part));
            };
            ids.extend(id(start, part)?..=id(end, part)?);
        } else {
            ids.push(id(part, part)?);
        }
    }
    Ok(ids)
}

fn get<'a>(meta: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    meta.get(key).map(|s| s.trim()).filter(|s| !s.is_empty())
}

fn flag(meta: &HashMap<String, String>, key: &'static str) -> Result<bool, TriggerError> {
    // The spellings Go's strconv.ParseBool takes, which KEDA uses.
    match get(meta, key) {
        None => Ok(false),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(TriggerError::new(
            key,
            format!("expected true or false, got {other:?}"),
        )),
    }
}

fn number(
    meta: &HashMap<String, String>,
    key: &'static str,
    default: i64,
) -> Result<i64, TriggerError> {
    // KEDA reads numbers as JSON: no `+`, no leading zeros.
    let json_integer = |v: &str| {
        let digits = v.strip_prefix('-').unwrap_or(v);
        !digits.starts_with('+') && (digits == "0" || !digits.starts_with('0'))
    };
    get(meta, key).map_or(Ok(default), |v| {
        v.parse()
            .ok()
            .filter(|_| json_integer(v))
            .ok_or_else(|| TriggerError::new(key, format!("cannot parse {v:?} as a number")))
    })
}

/// Reads the kafka trigger's scaling options from metadata, with KEDA's
/// defaults (`lagThreshold` 10, `offsetResetPolicy` latest), and checks them.
/// Replica bounds and windows are not trigger metadata: they stay at
/// `base`'s values.
pub fn params_from_metadata(
    meta: &HashMap<String, String>,
    base: KedaParams,
) -> Result<KedaParams, TriggerError> {
    let defaults = KedaParams::default();
    let offset_reset_latest = match get(meta, "offsetResetPolicy").unwrap_or("latest") {
        "latest" => true,
        "earliest" => false,
        other => {
            return Err(TriggerError::new(
                "offsetResetPolicy",
                format!("expected latest or earliest, got {other:?}"),
            ))
        }
    };
    let has_topic = get(meta, "topic").is_some();
    let partition_limitation = match get(meta, "partitionLimitation") {
        Some(text) if has_topic => Some(parse_partition_limitation(text)?),
        _ => None,
    };
    let params = KedaParams {
        lag_threshold: number(meta, "lagThreshold", defaults.lag_threshold)?,
        activation_lag_threshold: number(
            meta,
            "activationLagThreshold",
            defaults.activation_lag_threshold,
        )?,
        allow_idle_consumers: flag(meta, "allowIdleConsumers")?,
        limit_to_partitions_with_lag: flag(meta, "limitToPartitionsWithLag")?,
        ensure_even_distribution_of_partitions: flag(meta, "ensureEvenDistributionOfPartitions")?,
        partition_limitation,
        exclude_persistent_lag: flag(meta, "excludePersistentLag")?,
        offset_reset_latest,
        scale_to_zero_on_invalid_offset: flag(meta, "scaleToZeroOnInvalidOffset")?,
        ..base
    };
    validate(&params, has_topic)?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        [("topic", "t"), ("consumerGroup", "g")]
            .iter()
            .chain(pairs)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn refused(pairs: &[(&str, &str)]) -> TriggerError {
        params_from_metadata(&meta(pairs), KedaParams::default()).unwrap_err()
    }

    #[test]
    fn refuses_what_keda_refuses() {
        let e = refused(&[
            ("allowIdleConsumers", "true"),
            ("limitToPartitionsWithLag", "true"),
        ]);
        assert_eq!(e.key, "limitToPartitionsWithLag");
        assert!(e.rule.contains("allowIdleConsumers"), "{e}");
        assert_eq!(
            refused(&[("activationLagThreshold", "-1")]).key,
            "activationLagThreshold"
        );
        assert_eq!(refused(&[("lagThreshold", "0")]).key, "lagThreshold");
        for spelling in ["+5", "05", "5.0", "five"] {
            assert_eq!(refused(&[("lagThreshold", spelling)]).key, "lagThreshold");
        }
        assert_eq!(
            refused(&[
                ("limitToPartitionsWithLag", "true"),
                ("ensureEvenDistributionOfPartitions", "true"),
            ])
            .key,
            "ensureEvenDistributionOfPartitions"
        );
        assert_eq!(
            refused(&[("partitionLimitation", "1,x")]).key,
            "partitionLimitation"
        );
        assert_eq!(
            refused(&[("offsetResetPolicy", "none")]).key,
            "offsetResetPolicy"
        );
        assert_eq!(
            refused(&[("excludePersistentLag", "yes")]).key,
            "excludePersistentLag"
        );
        let no_topic: HashMap<String, String> =
            [("consumerGroup".to_string(), "g".to_string())].into();
        let mut with_lag = no_topic.clone();
        with_lag.insert("limitToPartitionsWithLag".into(), "true".into());
        assert!(params_from_metadata(&with_lag, KedaParams::default()).is_err());
        assert!(params_from_metadata(&no_topic, KedaParams::default()).is_ok());
    }

    #[test]
    fn reads_options_with_keda_defaults() {
        let p = params_from_metadata(&meta(&[]), KedaParams::default()).unwrap();
        assert_eq!(p.lag_threshold, 10);
        assert!(p.offset_reset_latest, "KEDA's default is latest");
        let p = params_from_metadata(
            &meta(&[
                ("lagThreshold", "3"),
                ("ensureEvenDistributionOfPartitions", "True"),
                ("partitionLimitation", " 0, 2-4 ,7"),
                ("offsetResetPolicy", "earliest"),
                ("scaleToZeroOnInvalidOffset", "1"),
            ]),
            KedaParams {
                max_replicas: 7,
                ..KedaParams::default()
            },
        )
        .unwrap();
        assert_eq!(p.lag_threshold, 3);
        assert!(p.ensure_even_distribution_of_partitions);
        assert_eq!(p.partition_limitation, Some(vec![0, 2, 3, 4, 7]));
        assert!(!p.offset_reset_latest && p.scale_to_zero_on_invalid_offset);
        assert_eq!(p.max_replicas, 7, "bounds come from the caller");
    }
}
