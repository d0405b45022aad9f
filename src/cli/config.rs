//! `serve`'s settings from a TOML file, environment variables and flags (flags > env > file >
//! defaults), generic over the clap command's arguments: every long option is a file key
//! (`snake_case` or `kebab-case`) and an environment variable (`VITRINE_` + its name), so a
//! new flag is configurable everywhere without being listed here.
//!
//! The file and environment values are turned into `--long=value` arguments, each checked on
//! its own (so an error names its key and file, or its variable), and appended to the command
//! line for a final parse, where only the arguments the command line left at their defaults
//! receive them. No IO here: the environment and the file reader are passed in.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

/// Prefix of the environment variable of each option: `--data-dir` is `VITRINE_DATA_DIR`.
pub const ENV_PREFIX: &str = "VITRINE_";
/// The argument naming the config file.
pub const CONFIG_ARG: &str = "config";
/// Arguments that steer this mechanism rather than the server: not settable from the file.
const CONTROL: [&str; 2] = [CONFIG_ARG, "print_config"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A command-line error (or --help): shown by clap.
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error("cannot read config file {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("unknown key `{key}` in config file {}", path.display())]
    UnknownKey { key: String, path: PathBuf },
    #[error("key `{key}` in config file {}: {message}", path.display())]
    FileValue { key: String, path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    EnvValue { var: String, message: String },
    #[error("{message} (settings from {from})")]
    Combined { message: String, from: String },
}

/// Where an option's effective value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Env(String),
    Flag,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File => f.write_str("config file"),
            Source::Env(var) => write!(f, "{var}"),
            Source::Flag => f.write_str("command line"),
        }
    }
}

/// The effective arguments and where each came from (keyed by argument id).
#[derive(Debug)]
pub struct Resolved {
    pub matches: ArgMatches,
    pub sources: BTreeMap<String, Source>,
    pub config_file: Option<PathBuf>,
}

/// The environment variable of a long option.
pub fn env_var(long: &str) -> String {
    format!("{ENV_PREFIX}{}", long.to_uppercase().replace('-', "_"))
}

/// The environment variable of `arg`: the one its definition names (`--tokens` reads
/// `VITRINE_TOKENS_FILE`, as its help says), else [`env_var`] of its long name.
fn arg_env(arg: &Arg, long: &str) -> String {
    arg.get_env().map_or_else(|| env_var(long), |e| e.to_string_lossy().into_owned())
}

/// `cmd` with no argument or group required: the first pass only reads what the command line
/// gives.
pub fn lenient(cmd: Command) -> Command {
    let groups: Vec<String> = cmd.get_groups().map(|g| g.get_id().to_string()).collect();
    let cmd = cmd.mut_args(|a| a.required(false));
    groups.iter().fold(cmd, |c, g| c.mut_group(g.as_str(), |g| g.required(false)))
}

/// The arguments that are settings: long options other than help, version and [`CONTROL`].
fn settings(cmd: &Command) -> impl Iterator<Item = (&Arg, &str)> {
    cmd.get_arguments().filter_map(|a| {
        let long = a.get_long()?;
        let control = CONTROL.contains(&a.get_id().as_str());
        let meta = matches!(
            a.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        );
        (!control && !meta).then_some((a, long))
    })
}

/// A value from the file or the environment.
enum Raw<'a> {
    Toml(&'a toml::Value),
    Env(&'a OsStr),
}

fn scalar(v: &toml::Value) -> Result<OsString, String> {
    Ok(match v {
        toml::Value::String(s) => s.into(),
        toml::Value::Integer(i) => i.to_string().into(),
        toml::Value::Float(f) => f.to_string().into(),
        toml::Value::Boolean(b) => b.to_string().into(),
        toml::Value::Datetime(d) => d.to_string().into(),
        toml::Value::Array(_) => return Err("expects one value, not a list".into()),
        toml::Value::Table(_) => return Err("expects a value, not a table".into()),
    })
}

fn boolean(raw: &Raw<'_>) -> Result<bool, String> {
    match raw {
        Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
        Raw::Toml(_) => Err("expects true or false".into()),
        Raw::Env(s) => match s.to_string_lossy().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" | "" => Ok(false),
            _ => Err("expects true or false".into()),
        },
    }
}

/// The command-line arguments that give `arg` the value `raw`.
fn to_args(arg: &Arg, long: &str, raw: &Raw<'_>) -> Result<Vec<OsString>, String> {
    let flag = || OsString::from(format!("--{long}"));
    let with = |v: OsString| {
        let mut s = OsString::from(format!("--{long}="));
        s.push(v);
        s
    };
    match arg.get_action() {
        ArgAction::SetTrue => Ok(if boolean(raw)? { vec![flag()] } else { vec![] }),
        ArgAction::SetFalse => Ok(if boolean(raw)? { vec![] } else { vec![flag()] }),
        ArgAction::Count => match raw {
            Raw::Toml(toml::Value::Integer(n)) if *n >= 0 => Ok((0..*n).map(|_| flag()).collect()),
            Raw::Env(s) => match s.to_string_lossy().parse::<u8>() {
                Ok(n) => Ok((0..n).map(|_| flag()).collect()),
                Err(_) => Err("expects a count".into()),
            },
            _ => Err("expects a count".into()),
        },
        ArgAction::Append => match raw {
            Raw::Toml(toml::Value::Array(items)) => items.iter().map(|v| scalar(v).map(with)).collect(),
            Raw::Toml(v) => Ok(vec![with(scalar(v)?)]),
            Raw::Env(s) => Ok(vec![with(s.to_os_string())]),
        },
        _ => match raw {
            Raw::Toml(v) => Ok(vec![with(scalar(v)?)]),
            Raw::Env(s) => Ok(vec![with(s.to_os_string())]),
        },
    }
}

/// The first line of a clap error, without its `error: ` prefix.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// The config file's keys, mapped to argument ids; an unknown key is an error.
fn file_values<'t>(
    cmd: &Command,
    table: &'t toml::Table,
    path: &Path,
) -> Result<BTreeMap<String, (&'t str, &'t toml::Value)>, ConfigError> {
    let mut out = BTreeMap::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let Some((arg, _)) = settings(cmd).find(|(_, l)| *l == long) else {
            return Err(ConfigError::UnknownKey { key: key.clone(), path: path.to_path_buf() });
        };
        let id = arg.get_id().to_string();
        if out.insert(id, (key.as_str(), value)).is_some() {
            return Err(ConfigError::FileValue {
                key: key.clone(),
                path: path.to_path_buf(),
                message: "given twice (as snake_case and kebab-case)".into(),
            });
        }
    }
    Ok(out)
}

/// Resolves the effective arguments of `cmd` (a command without binary name) from `argv`, the
/// environment (`env`) and the config file (`--config` or `VITRINE_CONFIG`, read by `read`).
pub fn resolve(
    cmd: &Command,
    argv: &[OsString],
    env: &dyn Fn(&str) -> Option<OsString>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Resolved, ConfigError> {
    let loose = lenient(cmd.clone());
    let first = loose.clone().try_get_matches_from(argv)?;
    let config_file = match first.get_raw(CONFIG_ARG).and_then(|mut v| v.next()) {
        Some(p) if first.value_source(CONFIG_ARG) == Some(ValueSource::CommandLine) => Some(PathBuf::from(p)),
        _ => env(&env_var(CONFIG_ARG)).filter(|p| !p.is_empty()).map(PathBuf::from),
    };
    let table = match &config_file {
        None => toml::Table::new(),
        Some(path) => {
            let text = read(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            toml::from_str::<toml::Table>(&text)
                .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.message().to_string() })?
        }
    };
    let path = config_file.clone().unwrap_or_default();
    let from_file = file_values(cmd, &table, &path)?;
    let mut extra: Vec<OsString> = Vec::new();
    let mut sources = BTreeMap::new();
    for (arg, long) in settings(cmd) {
        let id = arg.get_id().as_str();
        let var = arg_env(arg, long);
        let (source, args) = if first.value_source(id) == Some(ValueSource::CommandLine) {
            (Source::Flag, Vec::new())
        } else if let Some(v) = env(&var) {
            let args = to_args(arg, long, &Raw::Env(&v))
                .and_then(|a| loose.clone().try_get_matches_from(&a).map(|_| a).map_err(|e| clap_message(&e)))
                .map_err(|message| ConfigError::EnvValue { var: var.clone(), message })?;
            (Source::Env(var), args)
        } else if let Some((key, v)) = from_file.get(id) {
            let args = to_args(arg, long, &Raw::Toml(v))
                .and_then(|a| loose.clone().try_get_matches_from(&a).map(|_| a).map_err(|e| clap_message(&e)))
                .map_err(|message| ConfigError::FileValue {
                    key: key.to_string(),
                    path: path.clone(),
                    message,
                })?;
            (Source::File, args)
        } else {
            (Source::Default, Vec::new())
        };
        extra.extend(args);
        sources.insert(id.to_string(), source);
    }
    let combined = !extra.is_empty();
    let all: Vec<OsString> = argv.iter().cloned().chain(extra).collect();
    let matches = cmd.clone().try_get_matches_from(all).map_err(|e| {
        if !combined {
            return ConfigError::Cli(e);
        }
        let from = match &config_file {
            Some(p) => format!("the command line, the environment and {}", p.display()),
            None => "the command line and the environment".into(),
        };
        ConfigError::Combined { message: clap_message(&e), from }
    })?;
    Ok(Resolved { matches, sources, config_file })
}

/// A value as TOML: integers, floats and booleans bare, everything else a string (which reads back
/// the same, as every file value is handed to clap as text).
fn toml_value(arg: &Arg, raw: &[&OsStr]) -> toml::Value {
    let one = |s: &OsStr| {
        let s = s.to_string_lossy();
        match (s.parse::<i64>(), s.parse::<f64>()) {
            (Ok(i), _) => toml::Value::Integer(i),
            // Only where it reads back as the same text ("1.0" stays a string).
            (_, Ok(f)) if f.is_finite() && f.to_string() == s => toml::Value::Float(f),
            _ => toml::Value::String(s.into_owned()),
        }
    };
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => {
            toml::Value::Boolean(raw.first().is_some_and(|s| *s == OsStr::new("true")))
        }
        ArgAction::Count => toml::Value::Integer(raw.len() as i64),
        ArgAction::Append => toml::Value::Array(raw.iter().map(|s| one(s)).collect()),
        _ => raw.first().map_or(toml::Value::String(String::new()), |s| one(s)),
    }
}

/// The effective settings as TOML, every setting of `cmd` in order, each with its source; an
/// option without a value is a comment.
pub fn render(cmd: &Command, resolved: &Resolved) -> String {
    let mut out =
        String::from("# Effective settings of `vitrine serve` (flags > environment > file > defaults).\n");
    if let Some(p) = &resolved.config_file {
        out.push_str(&format!("# Config file: {}\n", p.display()));
    }
    for (arg, long) in settings(cmd) {
        let id = arg.get_id().as_str();
        let source = resolved.sources.get(id).cloned().unwrap_or(Source::Default);
        let raw: Vec<&OsStr> = resolved.matches.get_raw(id).map(Iterator::collect).unwrap_or_default();
        if raw.is_empty() && !matches!(arg.get_action(), ArgAction::Count | ArgAction::Append) {
            out.push_str(&format!("# {id} is not set ({})\n", arg_env(arg, long)));
            continue;
        }
        out.push_str(&format!("{id} = {} # {source}\n", toml_value(arg, &raw)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, FromArgMatches};

    fn serve_cmd() -> Command {
        super::super::serve_command()
    }

    /// A stand-in for flags other engineers add: a boolean, a path, a list, and a group of
    /// which one is required.
    #[derive(Args, Debug)]
    #[command(group(clap::ArgGroup::new("auth").required(true).multiple(true).args(["insecure", "tls_cert"])))]
    struct Extra {
        #[arg(long)]
        insecure: bool,
        #[arg(long, value_name = "FILE")]
        tls_cert: Option<PathBuf>,
        #[arg(long)]
        token: Vec<String>,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        print_config: bool,
    }

    fn extra_cmd() -> Command {
        Extra::augment_args(Command::new("t").no_binary_name(true))
    }

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    fn run(cmd: &Command, argv: &[&str], env: &[(&str, &str)], file: &str) -> Result<Resolved, ConfigError> {
        let env: BTreeMap<String, OsString> = env.iter().map(|(k, v)| (k.to_string(), v.into())).collect();
        let file = file.to_string();
        resolve(cmd, &args(argv), &|k| env.get(k).cloned(), &|_| Ok(file.clone()))
    }

    fn listen(r: &Resolved) -> String {
        r.matches.get_one::<String>("listen").unwrap().clone()
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let cmd = serve_cmd();
        let file = "data_dir = \"/d\"\nlisten = \"127.0.0.1:1\"\nmax-segments = 7\n";
        let conf = ["--config", "vitrine.toml"];
        let r = run(&cmd, &conf, &[], file).unwrap();
        assert_eq!(listen(&r), "127.0.0.1:1");
        assert_eq!(r.sources["listen"], Source::File);
        assert_eq!(*r.matches.get_one::<usize>("max_segments").unwrap(), 7, "kebab-case key");
        assert_eq!(r.sources["seal_items"], Source::Default);

        let env = [("VITRINE_LISTEN", "127.0.0.1:2")];
        let r = run(&cmd, &conf, &env, file).unwrap();
        assert_eq!(listen(&r), "127.0.0.1:2");
        assert_eq!(r.sources["listen"], Source::Env("VITRINE_LISTEN".into()));

        let r = run(&cmd, &["--config", "vitrine.toml", "--listen", "127.0.0.1:3"], &env, file).unwrap();
        assert_eq!(listen(&r), "127.0.0.1:3");
        assert_eq!(r.sources["listen"], Source::Flag);
        assert_eq!(r.matches.get_one::<PathBuf>("data_dir").unwrap(), Path::new("/d"));

        // The file can come from the environment too; the typed arguments parse.
        let env = [("VITRINE_CONFIG", "v.toml"), ("VITRINE_DATA_DIR", "/e")];
        let r = run(&cmd, &[], &env, file).unwrap();
        let a = super::super::ServeArgs::from_arg_matches(&r.matches).unwrap();
        assert_eq!((a.data_dir, a.max_segments, a.listen.as_str()), (PathBuf::from("/e"), 7, "127.0.0.1:1"));

        // An option whose definition names its variable (`--tokens`: VITRINE_TOKENS_FILE) reads
        // that one, and it beats the file as every variable does.
        let file = "data_dir = \"/d\"\ntokens = \"/file-tokens\"\n";
        let r = run(&cmd, &conf, &[("VITRINE_TOKENS_FILE", "/env-tokens")], file).unwrap();
        assert_eq!(r.matches.get_one::<PathBuf>("tokens").unwrap(), Path::new("/env-tokens"));
        assert_eq!(r.sources["tokens"], Source::Env("VITRINE_TOKENS_FILE".into()));
        let r = run(&cmd, &conf, &[], file).unwrap();
        assert!(render(&cmd, &r).contains("tokens = \"/file-tokens\" # config file"));
    }

    #[test]
    fn booleans_lists_and_new_flags_work_from_file_and_env() {
        let cmd = extra_cmd();
        let file = "insecure = true\ntls-cert = \"/c.pem\"\ntoken = [\"a\", \"b\"]\n";
        let r = run(&cmd, &["--config", "f.toml"], &[], file).unwrap();
        let e = Extra::from_arg_matches(&r.matches).unwrap();
        assert!(e.insecure);
        assert_eq!(e.tls_cert.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(e.token, ["a", "b"]);
        let r = run(&cmd, &["--config", "f.toml"], &[("VITRINE_INSECURE", "false")], file).unwrap();
        assert!(!Extra::from_arg_matches(&r.matches).unwrap().insecure, "env beats file");
        let r = run(&cmd, &["--config", "f.toml", "--token", "c"], &[], file).unwrap();
        assert_eq!(Extra::from_arg_matches(&r.matches).unwrap().token, ["c"], "flag list replaces");
        let err = run(&cmd, &["--config", "f.toml"], &[], "insecure = \"yes\"").unwrap_err().to_string();
        assert!(
            err.contains("`insecure`") && err.contains("f.toml") && err.contains("true or false"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_the_file() {
        let cmd = serve_cmd();
        let conf = ["--config", "/etc/vitrine.toml"];
        let err = run(&cmd, &conf, &[], "data_dir = \"/d\"\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKey { ref key, .. } if key == "listen_addr"), "{err}");
        assert!(err.to_string().contains("/etc/vitrine.toml"), "{err}");

        let err = run(&cmd, &conf, &[], "metrics_listen = \"nowhere\"\n").unwrap_err().to_string();
        assert!(err.contains("key `metrics_listen`") && err.contains("/etc/vitrine.toml"), "{err}");
        let err = run(&cmd, &conf, &[], "seal_items = \"many\"\n").unwrap_err().to_string();
        assert!(err.contains("key `seal_items`") && err.contains("many"), "{err}");
        let err = run(&cmd, &conf, &[], "seal_items = [1, 2]\n").unwrap_err().to_string();
        assert!(err.contains("key `seal_items`") && err.contains("list"), "{err}");
        let err = run(&cmd, &conf, &[], "print_config = true\n").unwrap_err().to_string();
        assert!(err.contains("unknown key `print_config`"), "{err}");
        let err = run(&cmd, &conf, &[], "listen = ").unwrap_err().to_string();
        assert!(err.contains("not valid TOML") && err.contains("/etc/vitrine.toml"), "{err}");

        let err =
            run(&cmd, &["--data-dir", "/d"], &[("VITRINE_SEAL_ITEMS", "x")], "").unwrap_err().to_string();
        assert!(err.contains("VITRINE_SEAL_ITEMS"), "{err}");
        // A bad flag stays clap's own error.
        let err = run(&cmd, &["--data-dir", "/d", "--seal-items", "x"], &[], "").unwrap_err();
        assert!(matches!(err, ConfigError::Cli(_)), "{err}");
    }

    #[test]
    fn the_example_file_is_valid_and_names_every_setting() {
        let cmd = serve_cmd();
        let example = include_str!("../../vitrine.example.toml");
        let r = run(&cmd, &["--config", "vitrine.example.toml"], &[], example).unwrap();
        assert_eq!(r.sources["data_dir"], Source::File);
        for (arg, _) in settings(&cmd) {
            let id = arg.get_id().as_str();
            assert!(example.contains(&format!("{id} = ")), "vitrine.example.toml does not show `{id}`");
        }
    }

    #[test]
    fn print_config_lists_every_setting_and_reads_back() {
        let cmd = serve_cmd();
        let argv = [
            "--config",
            "f.toml",
            "--seal-items",
            "9",
            "--guardrail-max-error-rate",
            "0.1",
            "--model",
            "1.0",
        ];
        let r = run(&cmd, &argv, &[], "data_dir = \"/d\"\n").unwrap();
        let text = render(&cmd, &r);
        for (_, long) in settings(&cmd) {
            let id = long.replace('-', "_");
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("{id} = ")) || l.starts_with(&format!("# {id} "))),
                "{id} missing in\n{text}"
            );
        }
        assert!(text.contains("seal_items = 9 # command line"), "{text}");
        assert!(text.contains("data_dir = \"/d\" # config file"), "{text}");
        assert!(text.contains("guardrail_max_error_rate = 0.1 # command line"), "{text}");
        assert!(
            text.contains("model = \"1.0\" # command line"),
            "a string that is not its float's text: {text}"
        );
        // The output is a valid config file giving the same settings.
        let again = run(&cmd, &["--config", "out.toml"], &[], &text).unwrap();
        assert_eq!(render(&cmd, &again).lines().skip(2).count(), text.lines().skip(2).count());
        assert_eq!(*again.matches.get_one::<usize>("seal_items").unwrap(), 9);
        assert_eq!(*again.matches.get_one::<f64>("guardrail_max_error_rate").unwrap(), 0.1);
        assert_eq!(again.matches.get_one::<String>("model").unwrap(), "1.0");
    }
}
