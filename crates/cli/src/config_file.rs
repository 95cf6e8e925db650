//! The optional TOML file (`--config FILE`): one key per flag, the flag's
//! name with `_` for `-` (`max_records = 500`), plus a `[kafka_properties]`
//! table. A key fills its flag only where the command line and the
//! environment left it unset (clap's value source tells them from a
//! default), so the order is: flag, environment, file, the library's
//! default. Each command's `Args` is both the clap parser and the serde
//! shape of its file; a key of another command is checked by that
//! command's parser and passed over (logged), so one file serves `run`,
//! `supervise` and the workers supervise starts; keys no command knows and
//! wrong types are errors that name the key, so typos surface.

use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, Command, ValueEnum};
use microbatch_kafka::ConfigError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Keys of the file that are tables, not flags.
const TABLES: &[&str] = &["kafka_properties"];

/// Flags that set one value in two spellings: a file key yields to its
/// twin given on the command line or in the environment.
const TWINS: &[(&str, &str)] = &[
    ("process_time_ms", "process_time_seconds"),
    ("group", "share_group"),
];

/// Keys whose values may hold credentials: an error about them does not
/// quote the value (serde's messages do).
const SECRET_KEYS: &[&str] = &["password", "url", "kafka_property", "kafka_properties"];

/// A command's arguments that can take values from the file.
pub trait FromFile: Serialize + DeserializeOwned {
    /// The file named by `--config` (or `MICROBATCH_CONFIG`), if any.
    fn config_file(&self) -> Option<&Path>;
}

/// `args` with the file's values for the flags left unset; `command` and
/// `matches` are the parser and the parse of the command `args` came from,
/// `root` the binary's parser (whose other commands' keys are passed over).
pub fn apply<T: FromFile>(
    args: T,
    root: &Command,
    command: &Command,
    matches: &ArgMatches,
) -> Result<T, ConfigError> {
    let Some(path) = args.config_file().map(Path::to_path_buf) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    merge(args, root, command, matches, &text, &path)
}

/// [`apply`] on the file's text.
pub fn merge<T: FromFile>(
    args: T,
    root: &Command,
    command: &Command,
    matches: &ArgMatches,
    text: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    let error = |rule: String| ConfigError::new("--config", format!("{}: {rule}", path.display()));
    let file: toml::Table = toml::from_str(text).map_err(|e| error(e.message().to_string()))?;
    let given =
        toml::Table::try_from(&args).map_err(|e| error(format!("cannot hold these flags: {e}")))?;
    let mut merged = given.clone();
    let refused = |key: &str, e: toml::de::Error| {
        if SECRET_KEYS.contains(&key) {
            error(format!(
                "`{key}`: not a valid value (not shown: it may hold a secret)"
            ))
        } else {
            error(format!("`{key}`: {}", e.message()))
        }
    };
    for (key, value) in file {
        if TABLES.contains(&key.as_str()) {
            let mut alone = given.clone();
            alone.insert(key.clone(), value.clone());
            if let Err(e) = toml::Value::Table(alone).try_into::<T>() {
                return Err(refused(&key, e));
            }
            merged.insert(key, value);
            continue;
        }
        let Some(arg) = flag_for(command, &key) else {
            // One file serves every command (supervise hands its file to
            // the workers it starts): another command's key is not ours,
            // but it must be right for its own command, whose start would
            // otherwise be refused over and over.
            let owners = owners_of(root, &key);
            if owners.is_empty() {
                if flag_for(root, &key).is_some() {
                    return Err(error(format!(
                        "`{key}`: --{} is read before the file; give it as a flag or in its \
                         environment variable",
                        key.replace('_', "-")
                    )));
                }
                return Err(error(format!(
                    "unknown key `{key}`: no --{} flag of any command",
                    key.replace('_', "-")
                )));
            }
            let names: Vec<&str> = owners.iter().map(|(c, _)| c.get_name()).collect();
            if !owners.iter().any(|(_, a)| fits(a, &value)) {
                let shown = if SECRET_KEYS.contains(&key.as_str()) {
                    "(not shown: it may hold a secret)".to_string()
                } else {
                    value.to_string()
                };
                return Err(error(format!(
                    "`{key}` (a key of `{}`): not a valid value {shown}",
                    names.join("`, `")
                )));
            }
            tracing::info!(
                key = %key,
                of = %names.join(", "),
                "the config file's key is another command's; `{}` passes over it",
                command.get_name()
            );
            continue;
        };
        let id = arg.get_id().as_str();
        if id == "config_file" {
            return Err(error("`config` cannot name another file".into()));
        }
        // A flag or variable given beats the file, as does its twin.
        let given_explicitly = |id: &str| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        let twin = TWINS
            .iter()
            .find_map(|&(a, b)| match id {
                _ if id == a => Some(b),
                _ if id == b => Some(a),
                _ => None,
            })
            .filter(|t| command.get_arguments().any(|a| a.get_id() == t));
        if given_explicitly(id) || twin.is_some_and(given_explicitly) {
            continue;
        }
        // Checked one key at a time, so an error names its key.
        let mut alone = given.clone();
        alone.insert(id.to_string(), value.clone());
        if let Err(e) = toml::Value::Table(alone).try_into::<T>() {
            return Err(refused(&key, e));
        }
        merged.insert(id.to_string(), value);
    }
    // Each key was checked alone; together they are read the same way.
    toml::Value::Table(merged)
        .try_into()
        .map_err(|_| error("the keys do not fit together".into()))
}

/// The flag of `command` that file key `key` names.
fn flag_for<'a>(command: &'a Command, key: &str) -> Option<&'a clap::Arg> {
    command
        .get_arguments()
        .find(|a| a.get_long().is_some_and(|l| l.replace('-', "_") == key))
}

/// The commands under `root` (subcommands of subcommands too) with a flag
/// that file key `key` names, and that flag.
fn owners_of<'a>(root: &'a Command, key: &str) -> Vec<(&'a Command, &'a clap::Arg)> {
    root.get_subcommands()
        .flat_map(|c| std::iter::once(c).chain(c.get_subcommands()))
        .filter_map(|c| Some((c, flag_for(c, key)?)))
        .collect()
}

/// Whether `value` is one that `arg` takes, by the flag's own parser (a
/// list: each item).
fn fits(arg: &clap::Arg, value: &toml::Value) -> bool {
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(x) => Some(x.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    };
    let items: Vec<Option<String>> = match value {
        toml::Value::Array(items) => items.iter().map(scalar).collect(),
        v => vec![scalar(v)],
    };
    if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
        return matches!(value, toml::Value::Boolean(_));
    }
    // A one-flag parser with the flag's value parser: the flag itself may
    // name others (conflicts, requirements) that this one does not have.
    let probe = Command::new("check").arg(
        clap::Arg::new("value")
            .long("value")
            .value_parser(arg.get_value_parser().clone())
            .allow_hyphen_values(true),
    );
    let accepts = |text: &str| {
        probe
            .clone()
            .try_get_matches_from(["check", "--value", text])
            .is_ok()
    };
    // The file's types are the flag's: text for a number (`"500"`) is as
    // wrong as a number for text, though the command line reads both.
    let free_text = accepts("not a number or a choice");
    let number = !free_text && accepts("1");
    let kinds_fit = |v: &toml::Value| match v {
        toml::Value::String(_) => !number,
        toml::Value::Integer(_) | toml::Value::Float(_) => !free_text,
        _ => true,
    };
    let items_of_value: Vec<&toml::Value> = match value {
        toml::Value::Array(items) => items.iter().collect(),
        v => vec![v],
    };
    items_of_value.into_iter().all(kinds_fit)
        && items
            .into_iter()
            .all(|item| item.is_some_and(|text| accepts(&text)))
}

/// Serde for a clap `ValueEnum`, through the names clap shows, so the file
/// spells a value as the command line does.
pub mod value_enum {
    use super::*;

    pub fn serialize<T: ValueEnum, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        let value = v
            .to_possible_value()
            .ok_or_else(|| serde::ser::Error::custom("a hidden value"))?;
        s.serialize_str(value.get_name())
    }

    pub fn deserialize<'de, T: ValueEnum, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        T::from_str(&text, true).map_err(serde::de::Error::custom)
    }
}

/// Implements serde for clap `ValueEnum`s through [`value_enum`].
#[macro_export]
macro_rules! serde_value_enum {
    ($($ty:ty),+ $(,)?) => {$(
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                $crate::config_file::value_enum::serialize(self, s)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::config_file::value_enum::deserialize(d)
            }
        }
    )+};
}

#[cfg(test)]
mod tests;
