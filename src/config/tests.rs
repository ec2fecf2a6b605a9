//! Loading settings: defaults, files, environment, and the messages that name what is wrong.
#![allow(clippy::result_large_err)] // figment's Jail closures return its large error type
use figment::Jail;

use std::time::Duration;

use secrecy::ExposeSecret;

use super::*;

fn load_err(jail: &mut Jail, key: &str, value: &str) -> String {
    jail.set_env(key, value);
    let error = match Settings::load(None) {
        Ok(_) => panic!("{key}={value} was accepted"),
        Err(e) => e.to_string(),
    };
    jail.clear_env();
    error
}

#[test]
fn defaults_work_on_a_developer_machine() {
    Jail::expect_with(|_| {
        let s = Settings::load(None).unwrap();
        assert_eq!(s.grpc.addr, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(
            s.database.url.expose_secret(),
            "postgres://postgres@127.0.0.1:5432/authd"
        );
        assert!(s.redis.enabled);
        assert_eq!(s.redis.key_prefix, "authd:");
        assert_eq!(s.session.idle_timeout, Duration::from_secs(7 * 86400));
        assert_eq!(s.session.absolute_timeout, Duration::from_secs(30 * 86400));
        assert_eq!(s.session.touch_interval, Duration::from_secs(300));
        assert!(s.auth.hash_concurrency >= 1);
        Ok(())
    });
}

#[test]
fn file_then_environment_override_defaults() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "authd.toml",
            "[redis]\nenabled = false\nkey_prefix = \"file:\"\n[session]\nidle_timeout = \"1h\"\n",
        )?;
        jail.set_env("SESSION__IDLE_TIMEOUT", "30m");
        jail.set_env("GRPC__ADDR", "127.0.0.1:6000");
        let s = Settings::load(Some(Path::new("authd.toml"))).unwrap();
        assert!(!s.redis.enabled);
        assert_eq!(s.redis.key_prefix, "file:");
        assert_eq!(s.session.idle_timeout, Duration::from_secs(1800));
        assert_eq!(s.grpc.addr, "127.0.0.1:6000".parse().unwrap());
        Ok(())
    });
}

#[test]
fn database_url_is_honoured_below_the_sectioned_name() {
    Jail::expect_with(|jail| {
        jail.set_env("DATABASE_URL", "postgres://a@h/x");
        let s = Settings::load(None).unwrap();
        assert_eq!(s.database.url.expose_secret(), "postgres://a@h/x");
        jail.set_env("DATABASE__URL", "postgres://b@h/y");
        let s = Settings::load(None).unwrap();
        assert_eq!(s.database.url.expose_secret(), "postgres://b@h/y");
        Ok(())
    });
}

#[test]
fn invalid_settings_are_named() {
    Jail::expect_with(|jail| {
        for (key, value) in [
            ("REDIS__ENABLED", "maybe"),
            ("SESSION__IDLE_TIMEOUT", "soon"),
            ("SESSION__TOUCH_INTERVAL", "8d"),
            ("DATABASE__MAX_CONNECTIONS", "0"),
            ("DATABASE__URL", "mysql://x"),
            ("REDIS__KEY_PREFIX", "has space"),
            ("AUTH__HASH_CONCURRENCY", "0"),
            ("REDIS__NO_SUCH_SETTING", "1"),
            ("LOG__FORMAT", "xml"),
            ("LOG__LEVEL", "inf"),
            ("LOG__LEVEL", "verbose"),
            ("LOG__LEVEL", "authd=debug,inf"),
        ] {
            let error = load_err(jail, key, value);
            assert!(error.contains(key), "{key}={value}: {error}");
        }
        Ok(())
    });
}

#[test]
fn log_levels_and_filters_are_taken() {
    Jail::expect_with(|jail| {
        for level in [
            "info",
            "WARN",
            "off",
            "authd=debug,sqlx=warn",
            "info,authd::rpc=warn",
            "info,[rpc]=debug",
            "authd[rpc]=trace",
        ] {
            jail.set_env("LOG__LEVEL", level);
            let s = Settings::load(None).unwrap();
            assert_eq!(s.log.level, level);
        }
        let error = load_err(jail, "LOG__LEVEL", "inf");
        assert!(error.contains("`inf` is not a level"), "{error}");
        // tracing would read ` info` as a target: refused, not silently off.
        for spaced in ["authd=debug, info", "info, authd=debug"] {
            let error = load_err(jail, "LOG__LEVEL", spaced);
            assert!(error.contains("spaces"), "{spaced:?}: {error}");
        }
        Ok(())
    });
}

#[test]
fn local_cache_settings_are_checked_together() {
    Jail::expect_with(|jail| {
        for (key, value) in [
            ("LOCAL_CACHE__LEASE", "100ms"),
            ("LOCAL_CACHE__LEASE", "2m"),
            ("LOCAL_CACHE__MAX_ENTRIES", "0"),
        ] {
            let error = load_err(jail, key, value);
            assert!(error.contains(key), "{key}={value}: {error}");
        }
        jail.set_env("LOCAL_CACHE__ENABLED", "true");
        let error = load_err(jail, "REDIS__ENABLED", "false");
        assert!(error.contains("LOCAL_CACHE__ENABLED"), "{error}");
        jail.set_env("LOCAL_CACHE__ENABLED", "true");
        jail.set_env("LOCAL_CACHE__LEASE", "9s");
        let error = load_err(jail, "GRPC__REQUEST_TIMEOUT", "10s");
        assert!(error.contains("LOCAL_CACHE__LEASE"), "{error}");
        jail.set_env("LOCAL_CACHE__ENABLED", "true");
        let s = Settings::load(None).unwrap();
        assert!(s.local_cache.enabled);
        assert_eq!(s.local_cache.lease, Duration::from_secs(3));
        Ok(())
    });
}

#[test]
fn passwords_are_read_verbatim_and_never_printed() {
    Jail::expect_with(|jail| {
        jail.set_env("REDIS__PASSWORD", "0031415926535897");
        let s = Settings::load(None).unwrap();
        let password = s
            .redis
            .password
            .as_ref()
            .unwrap()
            .expose_secret()
            .to_owned();
        assert_eq!(password, "0031415926535897");
        let debug = format!("{s:?}");
        assert!(!debug.contains("31415926535897"), "{debug}");
        jail.set_env("REDIS__ENABLED", "maybe");
        let error = Settings::load(None).unwrap_err().to_string();
        assert!(!error.contains("31415926535897"), "{error}");
        Ok(())
    });
}

#[test]
fn secrets_never_print() {
    Jail::expect_with(|jail| {
        jail.set_env("DATABASE__URL", "postgres://u:hunter2@h/db");
        jail.set_env("REDIS__URL", "redis://:hunter3@h:6379");
        let debug = format!("{:?}", Settings::load(None).unwrap());
        assert!(
            !debug.contains("hunter2") && !debug.contains("hunter3"),
            "{debug}"
        );
        Ok(())
    });
}

/// The reference (`docs/settings.md`) and README's summary.
const DOCUMENTED: [&str; 2] = [
    include_str!("../../docs/settings.md"),
    include_str!("../../README.md"),
];

/// Whether `name` looks like a setting (`SECTION__KEY`).
fn is_setting(name: &str) -> bool {
    name.contains("__")
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The names of a table row's first cell: `` `A__B__C`, `__D` `` is `A__B__C` and `A__B__D`.
fn row_names(first: &str) -> Vec<String> {
    let names: Vec<&str> = first.split(", ").map(|n| n.trim_matches('`')).collect();
    let stem = names[0].rsplit_once("__").map_or("", |(stem, _)| stem);
    names
        .iter()
        .map(|name| match name.strip_prefix("__") {
            Some(suffix) => format!("{stem}__{suffix}"),
            None => (*name).to_owned(),
        })
        .collect()
}

/// Every setting the docs' tables name (first column; several may share a row, the later ones
/// written as the first's suffix: `DATABASE__SHARES__LOOKUPS`, `__LOGINS`).
fn documented_settings() -> Vec<String> {
    let mut names: Vec<String> = DOCUMENTED
        .iter()
        .flat_map(|doc| doc.lines())
        .filter_map(|line| line.strip_prefix("| "))
        .filter_map(|rest| rest.split_once(" |").map(|(first, _)| first))
        .flat_map(row_names)
        .filter(|name| is_setting(name))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The settings a table row names (the later ones may be written as the first's suffix) and
/// the defaults it gives, one for all or one each; a default that is not a literal
/// (`(none)`, "half the cores") is left out.
fn documented_defaults(doc: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split(" | ").collect();
        let (Some(first), Some(defaults)) = (cells.first(), cells.get(1)) else {
            continue;
        };
        let Some(first) = first.strip_prefix("| ") else {
            continue;
        };
        let names = row_names(first);
        if !is_setting(&names[0]) {
            continue;
        }
        let values: Vec<Option<&str>> = defaults
            .split(", ")
            .map(|d| d.strip_prefix('`')?.strip_suffix('`'))
            .collect();
        for (i, name) in names.iter().enumerate() {
            let value = match values.len() {
                1 => values[0],
                _ => values.get(i).copied().flatten(),
            };
            if let Some(value) = value.filter(|v| !v.contains('`')) {
                pairs.push((name.clone(), value.to_owned()));
            }
        }
    }
    pairs
}

/// Every default the docs give as a value (the reference's and README's summary) is what the
/// loader has when nothing is set: set as written, it loads, and the settings are the built-in
/// ones (so the setting exists, and a default shown as `16KiB`, which the parser refused, or a
/// value the docs got wrong, fails here).
#[test]
fn every_documented_default_is_taken_as_written() {
    let rows: Vec<(String, String)> = DOCUMENTED
        .iter()
        .flat_map(|doc| documented_defaults(doc))
        .collect();
    assert!(rows.len() > 70, "the tables were found: {rows:?}");
    Jail::expect_with(|jail| {
        jail.clear_env();
        let builtin = format!("{:?}", Settings::load(None).unwrap());
        for (name, value) in &rows {
            jail.clear_env();
            jail.set_env(name, value);
            match Settings::load(None) {
                Err(error) => panic!("{name}={value} (its documented default) is refused: {error}"),
                Ok(loaded) => assert_eq!(
                    format!("{loaded:?}"),
                    builtin,
                    "{name}={value} is not the built-in default"
                ),
            }
        }
        Ok(())
    });
}

/// Every setting the docs list is read from the environment: its section is one the loader
/// takes (`TOKENS__*` once was not, and was silently ignored).
#[test]
fn every_documented_setting_is_read_from_the_environment() {
    let names = documented_settings();
    assert!(names.len() > 50, "the settings tables were found");
    for name in names {
        let section = name.split("__").next().unwrap().to_ascii_lowercase();
        assert!(
            SECTIONS.contains(&section.as_str()),
            "{name}: section {section} is not read"
        );
    }
    Jail::expect_with(|jail| {
        jail.set_env("TOKENS__KEY_ROTATION", "2h");
        jail.set_env("EXT_AUTHZ__COOKIE", "sid");
        jail.set_env("EXT_AUTHZ__USER_ID_HEADER", "x-user");
        let s = Settings::load(None).unwrap();
        assert_eq!(s.tokens.key_rotation, Duration::from_secs(7200));
        assert_eq!(s.ext_authz.cookie.as_deref(), Some("sid"));
        assert_eq!(s.ext_authz.user_id_header, "x-user");
        assert_eq!(s.ext_authz.session_id_header, "x-authd-session-id");
        Ok(())
    });
}

#[test]
fn ext_authz_settings_that_cannot_work_are_refused_by_name() {
    Jail::expect_with(|jail| {
        for (key, value, names) in [
            ("EXT_AUTHZ__COOKIE", "a;b", "EXT_AUTHZ__COOKIE"),
            ("EXT_AUTHZ__COOKIE", "", "EXT_AUTHZ__COOKIE"),
            (
                "EXT_AUTHZ__USER_ID_HEADER",
                "X-User",
                "EXT_AUTHZ__USER_ID_HEADER",
            ),
            (
                "EXT_AUTHZ__USER_ID_HEADER",
                "authorization",
                "EXT_AUTHZ__USER_ID_HEADER",
            ),
            (
                "EXT_AUTHZ__SESSION_ID_HEADER",
                "x y",
                "EXT_AUTHZ__SESSION_ID_HEADER",
            ),
            (
                "EXT_AUTHZ__SESSION_ID_HEADER",
                "x-authd-user-id",
                "EXT_AUTHZ__SESSION_ID_HEADER",
            ),
            (
                "EXT_AUTHZ__MAX_REQUEST_SIZE",
                "100",
                "EXT_AUTHZ__MAX_REQUEST_SIZE",
            ),
            ("EXT_AUTHZ__BEARER", "false", "EXT_AUTHZ__BEARER"),
        ] {
            jail.set_env("EXT_AUTHZ__ENABLED", "true");
            let error = load_err(jail, key, value);
            assert!(error.contains(names), "{key}={value}: {error}");
        }
        Ok(())
    });
}

#[test]
fn jwt_settings_are_read_and_those_that_cannot_work_are_refused_by_name() {
    Jail::expect_with(|jail| {
        jail.set_env("JWT__ENABLED", "true");
        jail.set_env("JWT__AUDIENCES", " orders, billing ,,");
        jail.set_env("JWT__ALGORITHM", "ES256");
        jail.set_env("JWT__MAX_TTL", "2m");
        let s = Settings::load(None).unwrap();
        assert_eq!(s.jwt.audiences, ["orders", "billing"]);
        assert_eq!(s.jwt.algorithm, super::JwtAlgorithm::ES256);
        assert_eq!(s.jwt.max_ttl, Duration::from_secs(120));
        assert_eq!(s.jwt.issuer, "authd");
        for (key, value, name) in [
            ("JWT__AUDIENCES", "", "JWT__AUDIENCES"),
            ("JWT__MAX_TTL", "2h", "JWT__MAX_TTL"),
            ("JWT__MAX_TTL", "1s", "JWT__MAX_TTL"),
            ("JWT__KEY_ROTATION", "10m", "JWT__KEY_ROTATION"),
            ("JWT__ALGORITHM", "RS256", "JWT__ALGORITHM"),
            ("JWT__ISSUER", "", "JWT__ISSUER"),
        ] {
            jail.set_env("JWT__ENABLED", "true");
            jail.set_env("JWT__AUDIENCES", "orders");
            let error = load_err(jail, key, value);
            assert!(error.contains(name), "{key}={value}: {error}");
        }
        Ok(())
    });
}
