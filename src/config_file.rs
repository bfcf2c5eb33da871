//! `--config PATH` (PROTOCOL §14.1): a TOML file that sets any flag, keyed by
//! the flag's name without dashes, `-` written `_`. A flag or its environment
//! variable wins over the file, the file over the default. Strict: an
//! unknown key, a value of the wrong type, or an unreadable file stops the
//! start (exit 2) naming the key or the file. `[[namespace]]` tables are
//! read strictly into [`NamespaceSpec`]s, which no flag sets.
//!
//! The file's values are turned into the command line they stand for and
//! parsed by clap with the rest, so every flag's own checks apply to them.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory};

use serde::Deserialize;

use crate::config::Cli;
use crate::hub::NamespaceSpec;

/// Why the config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file cannot be read.
    #[error("--config {path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// The file is not valid TOML.
    #[error("--config {path}: not valid TOML: {reason}")]
    NotToml {
        /// The file.
        path: String,
        /// The parser's message (with the line).
        reason: String,
    },
    /// A key that names no flag.
    #[error("--config {path}: unknown key `{key}`")]
    UnknownKey {
        /// The file.
        path: String,
        /// The key.
        key: String,
    },
    /// A value of a type the flag does not take.
    #[error("--config {path}: key `{key}`: {reason}")]
    WrongType {
        /// The file.
        path: String,
        /// The key.
        key: String,
        /// What was expected.
        reason: String,
    },
    /// A `[[namespace]]` table that is not one.
    #[error("--config {path}: namespace {index}: {reason}")]
    BadNamespace {
        /// The file.
        path: String,
        /// Which `[[namespace]]`, from 1.
        index: usize,
        /// What is wrong (an unknown key or a wrong type, named).
        reason: String,
    },
}

/// What a config file sets: flags, and namespaces, which no flag sets.
#[derive(Debug, Default)]
pub struct FileSettings {
    /// The command-line words of the keys no flag or variable overrides.
    pub words: Vec<OsString>,
    /// The `[[namespace]]` tables, in file order.
    pub namespaces: Vec<NamespaceSpec>,
}

/// The command-line words the file's keys stand for, for every key whose
/// flag was given neither on the command line nor in the environment, and
/// its namespaces.
pub fn file_settings(path: &Path, matches: &ArgMatches) -> Result<FileSettings, ConfigFileError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| ConfigFileError::Unreadable {
        path: name.clone(),
        reason: error.to_string(),
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|error| ConfigFileError::NotToml {
        path: name.clone(),
        reason: error.to_string().trim().to_string(),
    })?;
    let command = Cli::command();
    let mut settings = FileSettings::default();
    for (key, value) in &table {
        if key == "namespace" {
            settings.namespaces = namespaces(&name, value)?;
            continue;
        }
        let argument = command
            .get_arguments()
            .find(|argument| argument.get_id() == key.as_str() && argument.get_long().is_some())
            .filter(|_| key != "config");
        let Some(argument) = argument else {
            return Err(ConfigFileError::UnknownKey {
                path: name,
                key: key.clone(),
            });
        };
        let given = matches!(
            matches.value_source(key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        let long = format!("--{}", argument.get_long().unwrap_or_default());
        let own = flag_words(argument.get_action(), &long, value).map_err(|reason| {
            ConfigFileError::WrongType {
                path: name.clone(),
                key: key.clone(),
                reason: reason.to_string(),
            }
        })?;
        if !given {
            settings.words.extend(own);
        }
    }
    Ok(settings)
}

/// The `[[namespace]]` tables: each strictly a [`NamespaceSpec`], with
/// prefixes not repeated.
fn namespaces(path: &str, value: &toml::Value) -> Result<Vec<NamespaceSpec>, ConfigFileError> {
    let bad = |index: usize, reason: String| ConfigFileError::BadNamespace {
        path: path.to_string(),
        index,
        reason,
    };
    let toml::Value::Array(tables) = value else {
        return Err(bad(
            0,
            "write each namespace as a [[namespace]] table".into(),
        ));
    };
    let mut specs: Vec<NamespaceSpec> = Vec::with_capacity(tables.len());
    for (index, table) in tables.iter().enumerate() {
        let spec = NamespaceSpec::deserialize(table.clone())
            .map_err(|error| bad(index + 1, error.to_string().trim().to_string()))?;
        if specs.iter().any(|earlier| earlier.prefix == spec.prefix) {
            return Err(bad(
                index + 1,
                format!("prefix `{}` is given twice", spec.prefix),
            ));
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// The words `--flag [value]` for one key's value, by the kind of flag it
/// sets; the error says what the flag takes.
fn flag_words(
    action: &ArgAction,
    long: &str,
    value: &toml::Value,
) -> Result<Vec<OsString>, &'static str> {
    let pair = |text: &str| vec![OsString::from(long), OsString::from(text)];
    match (action, value) {
        (ArgAction::SetTrue, toml::Value::Boolean(on)) => Ok(if *on {
            vec![OsString::from(long)]
        } else {
            Vec::new()
        }),
        (ArgAction::SetTrue, _) => Err("expected true or false"),
        (ArgAction::Append, toml::Value::Array(items)) => {
            let mut words = Vec::new();
            for item in items {
                let toml::Value::String(item) = item else {
                    return Err("expected an array of strings");
                };
                words.extend(pair(item));
            }
            Ok(words)
        }
        (ArgAction::Append, toml::Value::String(item)) => Ok(pair(item)),
        (ArgAction::Append, _) => Err("expected a string or an array of strings"),
        (_, toml::Value::String(text)) => Ok(pair(text)),
        (_, toml::Value::Integer(number)) => Ok(pair(&number.to_string())),
        (_, toml::Value::Boolean(_)) => Err("expected a value, not true or false"),
        (_, _) => Err("expected a string or an integer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(action: ArgAction, toml_value: &str) -> Result<Vec<String>, &'static str> {
        let table: toml::Table = toml::from_str(&format!("v = {toml_value}")).unwrap();
        let value = table.get("v").unwrap();
        flag_words(&action, "--flag", value).map(|words| {
            words
                .into_iter()
                .map(|w| w.into_string().unwrap())
                .collect()
        })
    }

    #[test]
    fn each_kind_of_flag_takes_its_own_toml_type() {
        assert_eq!(words(ArgAction::SetTrue, "true"), Ok(vec!["--flag".into()]));
        assert_eq!(words(ArgAction::SetTrue, "false"), Ok(vec![]));
        assert!(words(ArgAction::SetTrue, "1").is_err());
        assert_eq!(
            words(ArgAction::Append, r#"["a", "b"]"#),
            Ok(vec![
                "--flag".into(),
                "a".into(),
                "--flag".into(),
                "b".into()
            ])
        );
        assert_eq!(
            words(ArgAction::Append, r#""a""#),
            Ok(vec!["--flag".into(), "a".into()])
        );
        assert!(words(ArgAction::Append, "[1]").is_err());
        assert_eq!(
            words(ArgAction::Set, "42"),
            Ok(vec!["--flag".into(), "42".into()])
        );
        assert_eq!(
            words(ArgAction::Set, r#""x""#),
            Ok(vec!["--flag".into(), "x".into()])
        );
        assert!(words(ArgAction::Set, "true").is_err());
        assert!(words(ArgAction::Set, "1.5").is_err());
        assert!(words(ArgAction::Set, "[1]").is_err());
    }
}
