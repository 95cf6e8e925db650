//! The `--config` layer against the binary's real commands.

use clap::{CommandFactory, FromArgMatches};
use proptest::prelude::*;

use super::*;
use crate::cmd::{Cli, Command as Sub};

/// Parses `line` (after `microbatch`) and layers `text` as its file.
fn layered(line: &str, text: &str) -> Result<Sub, ConfigError> {
    let words = std::iter::once("microbatch").chain(line.split_whitespace());
    let matches = Cli::command()
        .try_get_matches_from(words)
        .expect("the line parses");
    let cli = Cli::from_arg_matches(&matches).expect("the line parses");
    let parser = Cli::command();
    let (name, sub) = matches.subcommand().unwrap();
    let command = parser.find_subcommand(name).unwrap();
    let path = Path::new("f.toml");
    Ok(match cli.command {
        Sub::Run(a) => Sub::Run(merge(a, &parser, command, sub, text, path)?),
        Sub::Supervise(a) => Sub::Supervise(merge(a, &parser, command, sub, text, path)?),
        Sub::Lag(a) => Sub::Lag(merge(a, &parser, command, sub, text, path)?),
        Sub::Scaler(a) => Sub::Scaler(merge(a, &parser, command, sub, text, path)?),
        Sub::Produce(a) => Sub::Produce(merge(a, &parser, command, sub, text, path)?),
        Sub::Top(a) => Sub::Top(merge(a, &parser, command, sub, text, path)?),
        Sub::Demo(a) => Sub::Demo(merge(a, &parser, command, sub, text, path)?),
        other => other,
    })
}

/// The layered arguments as the file's table.
fn as_table(sub: &Sub) -> toml::Table {
    let table = match sub {
        Sub::Run(a) => toml::Table::try_from(a),
        Sub::Supervise(a) => toml::Table::try_from(a),
        Sub::Lag(a) => toml::Table::try_from(a),
        Sub::Scaler(a) => toml::Table::try_from(a),
        Sub::Produce(a) => toml::Table::try_from(a),
        Sub::Top(a) => toml::Table::try_from(a),
        Sub::Demo(a) => toml::Table::try_from(a),
        _ => unreachable!(),
    };
    table.expect("serializes")
}

fn run(line: &str, text: &str) -> crate::cmd::run::Args {
    match layered(&format!("run {line}"), text).expect("layered") {
        Sub::Run(a) => a,
        _ => unreachable!(),
    }
}

/// Each command's minimal line, and flags that are not file keys.
const COMMANDS: &[(&str, &str)] = &[
    ("run", "run"),
    ("supervise", "supervise"),
    ("lag", "lag --topic t --group g"),
    ("scaler", "scaler"),
    ("produce", "produce --topic t"),
    ("top", "top --topic t --group g"),
    ("demo", "demo"),
];

/// Values of the flag's kind, other than its default, for a file that
/// sets it: a value the file names but the merge drops would then show
/// as the default.
fn samples(arg: &clap::Arg) -> Vec<toml::Value> {
    // Flags whose values a parser function checks, not a list.
    let text = |v: &str| vec![toml::Value::String(v.into())];
    match arg.get_long() {
        Some("security-protocol") => return text("SASL_SSL"),
        Some("sasl-mechanism") => return text("PLAIN"),
        Some("ordering") => return text("partition"),
        Some("offset-reset") => return text("latest"),
        Some("group-protocol") => return text("consumer"),
        Some("kafka-property") => {
            let pair = vec![
                toml::Value::String("a".into()),
                toml::Value::String("b".into()),
            ];
            return vec![toml::Value::Array(vec![toml::Value::Array(pair)])];
        }
        _ => {}
    }
    let default = arg
        .get_default_values()
        .first()
        .map(|v| v.to_string_lossy().into_owned());
    let possible: Vec<String> = arg
        .get_possible_values()
        .iter()
        .map(|p| p.get_name().to_string())
        .filter(|p| Some(p) != default.as_ref())
        .collect();
    match arg.get_action() {
        clap::ArgAction::SetTrue => return vec![toml::Value::Boolean(true)],
        clap::ArgAction::Append => {
            return vec![
                toml::Value::Array(vec![toml::Value::String("a=b".into())]),
                toml::Value::Array(vec![toml::Value::Integer(1)]),
            ]
        }
        _ => {}
    }
    if let Some(p) = possible.first() {
        return vec![toml::Value::String(p.clone())];
    }
    if let Some(d) = &default {
        if let Ok(n) = d.parse::<i64>() {
            return vec![toml::Value::Integer(n + 1)];
        }
        if let Ok(x) = d.parse::<f64>() {
            return vec![toml::Value::Float(x + 0.5)];
        }
    }
    // A default the flag parses itself (`key` for --health-scope) is a
    // value it accepts.
    let mut values = vec![
        toml::Value::Integer(1),
        toml::Value::String("1.2.3.4".into()),
    ];
    values.extend(default.map(toml::Value::String));
    values
}

/// Equal as the flag sees it (an integer in the file fills a float).
fn same(a: Option<&toml::Value>, b: Option<&toml::Value>) -> bool {
    let num = |v: Option<&toml::Value>| match v {
        Some(toml::Value::Integer(n)) => Some(*n as f64),
        Some(toml::Value::Float(x)) => Some(*x),
        _ => None,
    };
    a == b || num(a).is_some() && num(a) == num(b)
}

#[test]
fn every_flag_of_every_command_is_a_key_of_the_file() {
    let parser = Cli::command();
    for (name, line) in COMMANDS {
        let command = parser.find_subcommand(name).expect("the command exists");
        let mut keys = 0;
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            // The line's own flags beat the file (tested below), and so do
            // their twins (a_given_twin_beats…).
            let given_twin = super::TWINS.iter().any(|&(a, b)| {
                let (a, b) = (a.replace('_', "-"), b.replace('_', "-"));
                (long == a && line.contains(&format!("--{b} ")))
                    || (long == b && line.contains(&format!("--{a} ")))
            });
            if ["config", "help"].contains(&long)
                || line.contains(&format!("--{long} "))
                || given_twin
            {
                continue;
            }
            let key = long.replace('-', "_");
            let mut reached = false;
            let mut last = None;
            for value in samples(arg) {
                let mut table = toml::Table::new();
                table.insert(key.clone(), value.clone());
                match layered(line, &toml::to_string(&table).unwrap()) {
                    Ok(sub) => {
                        let got = as_table(&sub);
                        assert!(
                            same(got.get(arg.get_id().as_str()), Some(&value)),
                            "{name} --{long}: the file's `{key}` = {value} did not reach \
                             the flag: {:?}",
                            got.get(arg.get_id().as_str())
                        );
                        reached = true;
                        break;
                    }
                    Err(e) => {
                        assert!(
                            !e.rule.contains("unknown key"),
                            "{name} --{long}: the file has no key `{key}`: {e}"
                        );
                        assert!(e.rule.contains(&format!("`{key}`")), "{name} --{long}: {e}");
                        last = Some(e);
                    }
                }
            }
            assert!(
                reached,
                "{name} --{long}: no sample value was accepted: {last:?}"
            );
            keys += 1;
        }
        assert!(keys >= 3, "{name}: only {keys} flags found");
    }
}

#[test]
fn a_flag_beats_the_file_which_beats_the_default() {
    let a = run(
        "--topic t --group g --max-records 7",
        "max_records = 3\nconcurrency = 5\nordering = \"partition\"\n",
    );
    assert_eq!(a.max_records, 7, "the flag wins");
    assert_eq!(a.concurrency, 5, "the file fills what the line left unset");
    assert_eq!(
        a.ordering,
        Some(microbatch_core::config::Ordering::Partition)
    );
    assert_eq!(
        a.max_wait_ms,
        microbatch_core::config::defaults::MAX_WAIT_MS,
        "the library's default for the rest"
    );
}

#[test]
fn the_file_gives_kafka_properties_and_required_values() {
    let a = run(
        "",
        "topic = \"t\"\ngroup = \"g\"\npoison_marker = \"bad\"\naudit_log = \"/tmp/a\"\n\
         [kafka_properties]\n\"fetch.min.bytes\" = \"1\"\n",
    );
    assert_eq!(a.workers.resolve().unwrap(), ("t".into(), "g".into()));
    assert_eq!(a.poison_marker.as_deref(), Some("bad"));
    assert_eq!(a.audit_log.as_deref(), Some(Path::new("/tmp/a")));
    assert_eq!(a.kafka.kafka_properties["fetch.min.bytes"], "1");
}

#[test]
fn unknown_keys_and_wrong_types_name_the_key() {
    let e = layered("run", "max_recordz = 3\n").unwrap_err();
    assert_eq!(e.field, "--config");
    assert!(e.rule.contains("max_recordz"), "{e}");
    let e = layered("run", "max_records = \"many\"\n").unwrap_err();
    assert!(e.rule.contains("`max_records`"), "{e}");
    let e = layered("run", "ordering = \"sideways\"\n").unwrap_err();
    assert!(e.rule.contains("`ordering`"), "{e}");
    let e = layered("run", "password = 424242\n").unwrap_err();
    assert!(
        e.rule.contains("`password`") && !e.rule.contains("424242"),
        "{e}"
    );
    let e = layered("run", "[kafka_properties]\n\"sasl.password\" = 424242\n").unwrap_err();
    assert!(!e.rule.contains("424242"), "{e}");
    let e = layered("run", "config = \"other.toml\"\n").unwrap_err();
    assert!(e.rule.contains("another file"), "{e}");
}

/// The replaced system's `PROCESS_TIME_SECONDS` (or
/// `--process-time-seconds`) given beats the file's `process_time_ms`:
/// the file is below the environment for the one value both name.
#[test]
fn a_given_twin_beats_the_files_spelling() {
    let a = run("--process-time-seconds 0.25", "process_time_ms = 5\n");
    assert_eq!(a.process_time_ms, None, "the file's ms yields");
    assert_eq!(a.process_time_seconds, Some(0.25));
    let a = run("--process-time-ms 7", "process_time_seconds = 3.0\n");
    assert_eq!(a.process_time_seconds, None);
    assert_eq!(a.process_time_ms, Some(7));
    let a = run("", "process_time_ms = 5\n");
    assert_eq!(a.process_time_ms, Some(5), "alone, the file fills it");
}

/// The group given on the command line beats the file's other kind of
/// group; both in the file is refused, naming --share-group (the flags'
/// own conflict never sees the file).
#[test]
fn a_group_given_beats_the_files_share_group_and_both_in_the_file_are_refused() {
    let a = run("--group g --topic t", "share_group = \"s\"\n");
    assert_eq!(a.share_group, None, "the file's share group yields");
    assert_eq!(a.workers.group.as_deref(), Some("g"));
    let a = run("--share-group s --topic t", "group = \"g\"\n");
    assert_eq!(a.workers.group, None, "the file's group yields");
    assert_eq!(a.share_group.as_deref(), Some("s"));
    let a = run("--topic t", "group = \"g\"\nshare_group = \"s\"\n");
    let err = a.resolve().err().expect("both refused").to_string();
    assert!(err.contains("--share-group"), "{err}");
}

/// A file written for `supervise` (policy, lag threshold) is also the
/// file of the `run` workers it starts (they inherit
/// `MICROBATCH_CONFIG`): each command takes its own keys and passes
/// over the others'. Refusing them made every worker exit 2, restarted
/// forever.
#[test]
fn one_file_serves_every_command() {
    let text = "topic = \"t\"\ngroup = \"g\"\nmax_records = 7\n\
                policy = \"rate\"\nlag_threshold = 50\npartitions = 3\n";
    let a = run("", text);
    assert_eq!(a.max_records, 7);
    match layered("supervise", text).expect("supervise reads the same file") {
        Sub::Supervise(s) => assert_eq!(s.workers.resolve().unwrap().0, "t"),
        _ => unreachable!(),
    }
    layered("lag --topic t --group g", text).expect("lag reads the same file");
    let e = layered("supervise", "lag_treshold = 5\n").unwrap_err();
    assert!(
        e.rule.contains("`lag_treshold`"),
        "a typo is still refused: {e}"
    );
    // Passed over by supervise, but its workers would refuse it, each
    // start: refused here, once.
    let e = layered("supervise", "max_records = \"500\"\n").unwrap_err();
    assert!(
        e.rule.contains("`max_records`") && e.rule.contains("`run`"),
        "{e}"
    );
    let e = layered("run --topic t --group g", "policy = \"sideways\"\n").unwrap_err();
    assert!(e.rule.contains("`policy`"), "{e}");
    let e = layered("run --topic t --group g", "log_level = \"debug\"\n").unwrap_err();
    assert!(e.rule.contains("read before the file"), "{e}");
}

/// `run`'s flags with a default: (long flag, environment variable, default).
fn run_defaults() -> Vec<(String, Option<String>, String)> {
    let parser = Cli::command();
    let run = parser.find_subcommand("run").unwrap();
    run.get_arguments()
        .filter_map(|a| {
            let default = a
                .get_default_values()
                .first()?
                .to_string_lossy()
                .into_owned();
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            Some((a.get_long()?.to_string(), env, default))
        })
        .collect()
}

#[test]
fn the_readme_table_shows_each_default_of_run() {
    let readme = include_str!("../../../../README.md");
    let mut checked = 0;
    for (long, _, default) in run_defaults() {
        let flag = format!("`--{long}`");
        let row = readme
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .find(|l| {
                let first = l.split('|').nth(1).unwrap_or("");
                first.contains(&flag) || first.contains(&format!("`--{long} "))
            })
            .unwrap_or_else(|| panic!("README's flag table has no row for --{long}"));
        let cell = row.split('|').nth(3).unwrap_or("").replace('`', "");
        assert!(
            cell.split(|c: char| c.is_whitespace() || c == '/' || c == ',')
                .any(|w| w == default),
            "README says `{}` for --{long}, the binary's default is {default}",
            cell.trim()
        );
        checked += 1;
    }
    assert!(checked > 20, "only {checked} defaults checked");
}

#[test]
fn the_kits_config_shows_the_binarys_defaults_where_it_says_so() {
    let env = include_str!("../../../../deploy/k8s/base/config.env");
    let (_, ours) = env
        .split_once("# Ours")
        .expect("config.env marks the binary's own variables");
    let defaults = run_defaults();
    let mut checked = 0;
    for line in ours
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
    {
        let (key, value) = line.split_once('=').unwrap();
        if let Some((long, _, default)) =
            defaults.iter().find(|(_, e, _)| e.as_deref() == Some(key))
        {
            assert_eq!(value, default, "config.env {key} (--{long})");
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} variables checked");
}

/// Every (command, long flag, default) of the binary.
fn all_defaults() -> Vec<(String, String, String)> {
    let parser = Cli::command();
    parser
        .get_subcommands()
        .flat_map(|cmd| {
            cmd.get_arguments()
                .filter_map(|a| {
                    let default = a.get_default_values().first()?.to_string_lossy();
                    Some((
                        cmd.get_name().to_string(),
                        a.get_long()?.to_string(),
                        default.into_owned(),
                    ))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Where the docs state a flag's default in prose ("`--x` (default 1
/// s)", "`--x`, 300 by default", "`--x` (600)"), the number is one of
/// the binary's defaults for that flag (the same flag may differ by
/// command: `--http-port`).
#[test]
fn the_docs_state_each_default_as_the_binary_has_it() {
    let docs = [
        ("README.md", include_str!("../../../../README.md")),
        (
            "docs/delivery.md",
            include_str!("../../../../docs/delivery.md"),
        ),
        (
            "docs/scaling.md",
            include_str!("../../../../docs/scaling.md"),
        ),
        ("docs/deploy.md", include_str!("../../../../docs/deploy.md")),
        ("docs/design.md", include_str!("../../../../docs/design.md")),
    ];
    let defaults = all_defaults();
    let mut checked = 0;
    for (file, text) in docs {
        let text = text.replace('\n', " ");
        for (at, _) in text.match_indices("`--") {
            let rest = &text[at + 1..];
            let Some(end) = rest.find('`') else { continue };
            let long = &rest[2..end];
            let after = &rest[end + 1..];
            // The number and its unit, in one of the three forms.
            let stated = if let Some(t) = after.strip_prefix(" (default ") {
                Some(t)
            } else if let Some(t) = after.strip_prefix(", ") {
                t.split_once(" by default")
                    .map(|(n, _)| n)
                    .filter(|n| n.len() < 12)
            } else {
                after
                    .strip_prefix(" (")
                    .filter(|t| t.starts_with(|c: char| c.is_ascii_digit()))
            };
            let Some(stated) = stated else { continue };
            let number: String = stated
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ',')
                .filter(|c| *c != ',')
                .collect();
            let Ok(value) = number.parse::<f64>() else {
                continue;
            };
            let unit = stated[number.len()..].trim_start();
            let mine: Vec<&String> = defaults
                .iter()
                .filter(|(_, l, _)| l == long)
                .map(|(_, _, d)| d)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let in_flag_unit = value
                * match unit.split(|c: char| !c.is_ascii_alphabetic()).next() {
                    Some("s") if long.ends_with("-ms") => 1000.0,
                    Some("KiB") => 1024.0,
                    Some("MiB") => 1024.0 * 1024.0,
                    Some("GiB") => 1024.0 * 1024.0 * 1024.0,
                    _ => 1.0,
                };
            assert!(
                mine.iter().any(|d| d.parse::<f64>() == Ok(in_flag_unit)),
                "{file} states {number} {unit:.4} for --{long}; the binary's defaults are {mine:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} stated defaults checked");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("MICROBATCH_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000)
    ))]

    /// Any text, and any line made of our keys with values of any
    /// type, is read or refused with an error that names the file:
    /// never a panic.
    #[test]
    fn any_config_file_is_read_or_refused_naming_the_file(
        text in prop_oneof![
            "[ -~\\n]{0,200}",
            (
                prop_oneof![
                    proptest::sample::select(["max_records", "handler_env", "dlq", "url", "kafka_properties", "ordering", "kafka_property"].map(String::from).to_vec()),
                    "[a-z_]{1,12}",
                ],
                prop_oneof![
                    proptest::sample::select(["3", "-1", "\"x\"", "[\"A\"]", "{}", "1e400", "true", "[[\"a\", \"b\"]]"].map(String::from).to_vec()),
                    "[ -~]{0,12}",
                ],
            ).prop_map(|(k, v)| format!("{k} = {v}\n")),
        ]
    ) {
        if let Err(e) = layered("run", &text) {
            prop_assert_eq!(e.field, "--config", "{}", e);
        }
    }
}
