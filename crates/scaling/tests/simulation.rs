//! The scaling simulator's goals, asserted on simulated figures (virtual
//! time: hours of load in seconds, the same figures on every machine). The
//! table they come from is in bench/README.md (`cargo test -p
//! microbatch-scaling --test simulation -- --nocapture` prints it).

use microbatch_scaling::sim::{markdown, table, PolicyCase, Row, Shape, SimConfig, TARGET_DRAIN};

fn rows() -> (SimConfig, Vec<Row>) {
    let cfg = SimConfig::default();
    let rows = table(&cfg);
    println!("{}", markdown(&rows));
    (cfg, rows)
}

fn find(rows: &[Row], shape: Shape, policy: PolicyCase) -> &Row {
    rows.iter()
        .find(|r| r.shape == shape && r.policy == policy)
        .expect("every shape runs under every policy")
}

#[test]
fn rate_costs_no_more_than_keda_serves_in_time_and_holds_steady_load() {
    let (cfg, rows) = rows();
    let mut failures = Vec::new();
    for shape in Shape::ALL {
        let rate = &find(&rows, shape, PolicyCase::Rate).outcome;
        for keda in [PolicyCase::KedaThreshold3, PolicyCase::KedaTuned] {
            let k = &find(&rows, shape, keda).outcome;
            if rate.replica_seconds > k.replica_seconds {
                failures.push(format!(
                    "{}: rate {:.0} replica-seconds > {} {:.0}",
                    shape.name(),
                    rate.replica_seconds,
                    keda.name(),
                    k.replica_seconds
                ));
            }
        }
        if let Some(arrival) = shape.steady_rate() {
            let enough = (arrival / cfg.capacity_per_replica).ceil() as u32;
            if rate.max_replicas_after_warmup > enough + 1 {
                failures.push(format!(
                    "{}: rate held {} replicas after warm-up, more than ceil({arrival}/{}) + 1 = {}",
                    shape.name(),
                    rate.max_replicas_after_warmup,
                    cfg.capacity_per_replica,
                    enough + 1
                ));
            }
            if rate.worst_lag_seconds_after_warmup > TARGET_DRAIN.as_secs_f64() {
                failures.push(format!(
                    "{}: rate fell {:.1} s behind on steady load",
                    shape.name(),
                    rate.worst_lag_seconds_after_warmup
                ));
            }
        }
        if matches!(shape, Shape::Diurnal | Shape::Ramp)
            && rate.worst_lag_seconds > TARGET_DRAIN.as_secs_f64()
        {
            failures.push(format!(
                "{}: worst lag {:.1} s is past the {} s target",
                shape.name(),
                rate.worst_lag_seconds,
                TARGET_DRAIN.as_secs()
            ));
        }
        if shape.outage().is_some() {
            for policy in PolicyCase::ALL {
                let o = &find(&rows, shape, policy).outcome;
                println!(
                    "{}: {} added {:?} replicas during the outage",
                    shape.name(),
                    policy.name(),
                    o.added_during_outage
                );
            }
            if rate.added_during_outage != Some(0) {
                failures.push(format!(
                    "{}: rate added {:?} replicas while the downstream was down",
                    shape.name(),
                    rate.added_during_outage
                ));
            }
        }
        if shape.outage().is_some() && rate.drain_seconds.is_none() {
            failures.push(format!("{}: rate never drained", shape.name()));
        }
        if shape == Shape::BurstOnIdle || shape == Shape::BurstOnSteady {
            let drain = rate.drain_seconds.unwrap_or(f64::INFINITY);
            if drain > TARGET_DRAIN.as_secs_f64() {
                failures.push(format!("{}: rate drained in {drain:.0} s", shape.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_simulation_is_deterministic() {
    let cfg = SimConfig::default();
    for shape in [Shape::BurstOnSteady, Shape::HotPartition] {
        let a = microbatch_scaling::sim::run(shape, PolicyCase::Rate.policy(&cfg).as_mut(), &cfg);
        let b = microbatch_scaling::sim::run(shape, PolicyCase::Rate.policy(&cfg).as_mut(), &cfg);
        assert_eq!(a, b);
    }
}
