//! A container's hibernation settings: OCI annotations over the node's defaults.
//!
//! Under Kubernetes the annotations come from the pod (and container) annotations that the
//! handler passes through (`pod_annotations = ["runc-architect.io/*"]`); the node defaults
//! come from the handler's runtime options (`Hibernate`, `FreezeAfter`, `ScaledownAfter`,
//! `InitialDelay`). An annotation, when present, wins over the node default.
//!
//! | annotation                        | value                          | default          |
//! |-----------------------------------|--------------------------------|------------------|
//! | `runc-architect.io/hibernate`       | `true` / `false`               | node (off)       |
//! | `runc-architect.io/freeze-after`    | Go duration, `0` = tier off    | node (`2s`)      |
//! | `runc-architect.io/scaledown-after` | Go duration, `0` = tier off    | node (`60s`)     |
//! | `runc-architect.io/initial-delay`   | Go duration                    | node (`0`)       |
//! | `runc-architect.io/wake-ports`      | `8080,9090` (comma or space)   | every listening TCP port |
//! | `runc-architect.io/shadow-ports`    | `9100` or `19090:8080`, listed | none             |
//!
//! Validation is strict, because a malformed value must fail Create (INVALID_ARGUMENT) and
//! never pass silently:
//! - every value is checked, also when hibernation is off (a typo in a value that would
//!   matter once someone turns hibernation on must not wait until then);
//! - an annotation under `runc-architect.io/` that this module does not know is refused
//!   (the prefix is the project's own, so an unknown key is a misspelt one);
//! - durations are Go's (see [`super::duration`]), never negative;
//! - ports are 1 to 65535, listed once; a shadow port is `PORT` or `SHADOW:APP` with
//!   SHADOW != APP, and is never also a wake port;
//! - an empty `wake-ports` is refused (it would mean "nothing wakes it", surely a mistake),
//!   an empty `shadow-ports` means none.
//!
//! The sandbox (pause) container of a pod is never hibernated ([`Settings::for_container`]).
//!
//! Errors name the annotation or option and the value:
//! `annotation runc-architect.io/freeze-after: invalid duration "2x": unknown unit "x"`.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::duration::{self, DurationError};

/// The prefix of every annotation of runc-architect.
pub const PREFIX: &str = "runc-architect.io/";
/// `"true"` turns hibernation on for the container.
pub const HIBERNATE: &str = "runc-architect.io/hibernate";
/// Idle time before the container is frozen; `0` turns the tier off.
pub const FREEZE_AFTER: &str = "runc-architect.io/freeze-after";
/// Idle time before the container is checkpointed and its processes are gone; `0` = off.
pub const SCALEDOWN_AFTER: &str = "runc-architect.io/scaledown-after";
/// No hibernation this long after start.
pub const INITIAL_DELAY: &str = "runc-architect.io/initial-delay";
/// The TCP ports whose traffic counts as activity and wakes the container.
pub const WAKE_PORTS: &str = "runc-architect.io/wake-ports";
/// Ports whose traffic never counts nor wakes: `PORT` or `SHADOW:APP`.
pub const SHADOW_PORTS: &str = "runc-architect.io/shadow-ports";
/// Every annotation this module reads.
pub const ANNOTATIONS: [&str; 6] = [
    HIBERNATE,
    FREEZE_AFTER,
    SCALEDOWN_AFTER,
    INITIAL_DELAY,
    WAKE_PORTS,
    SHADOW_PORTS,
];

/// CRI's annotation telling a pod's sandbox container from its app containers.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// [`CRI_CONTAINER_TYPE`]'s value for the sandbox (pause) container.
pub const CRI_CONTAINER_TYPE_SANDBOX: &str = "sandbox";

/// Runtime option keys (the handler's TOML `options` table).
pub const OPTION_HIBERNATE: &str = "Hibernate";
pub const OPTION_FREEZE_AFTER: &str = "FreezeAfter";
pub const OPTION_SCALEDOWN_AFTER: &str = "ScaledownAfter";
pub const OPTION_INITIAL_DELAY: &str = "InitialDelay";

/// Node default of `freeze-after`.
pub const DEFAULT_FREEZE_AFTER: Duration = Duration::from_secs(2);
/// Node default of `scaledown-after`.
pub const DEFAULT_SCALEDOWN_AFTER: Duration = Duration::from_secs(60);

/// A port whose traffic never counts as activity nor wakes the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShadowPort {
    /// The port clients connect to.
    pub port: u16,
    /// With `SHADOW:APP`: the app's port that connections to `port` are redirected to
    /// (for apps that serve metrics on their main port). `None` for a plain `PORT`, the
    /// app's own (e.g. a separate metrics port).
    pub app: Option<u16>,
}

/// One container's hibernation settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    /// Idle time before FROZEN; `None`: the tier is off (never frozen).
    pub freeze_after: Option<Duration>,
    /// Idle time (from the last activity) before SCALED_DOWN; `None`: the tier is off.
    pub scaledown_after: Option<Duration>,
    /// Nothing happens this long after the start.
    pub initial_delay: Duration,
    /// `None`: every TCP port the container listens on when it goes to sleep (less the
    /// shadow ports).
    pub wake_ports: Option<Vec<u16>>,
    pub shadow_ports: Vec<ShadowPort>,
}

/// The node-wide defaults, from the handler's runtime options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDefaults {
    pub enabled: bool,
    pub freeze_after: Option<Duration>,
    pub scaledown_after: Option<Duration>,
    pub initial_delay: Duration,
}

/// The runtime options as the handler's TOML carries them (`Hibernate = true`,
/// `FreezeAfter = "2s"`, ...); `None` where the key is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeOptions {
    pub hibernate: Option<bool>,
    pub freeze_after: Option<String>,
    pub scaledown_after: Option<String>,
    pub initial_delay: Option<String>,
}

/// A refused setting: which annotation or runtime option, and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("annotation {key}: {problem}")]
    Annotation { key: String, problem: ValueError },
    #[error("runtime option {key}: {problem}")]
    RuntimeOption { key: String, problem: ValueError },
}

/// What is wrong with a value (it is quoted in the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("invalid duration {value:?}: {reason}")]
    Duration {
        value: String,
        reason: DurationError,
    },
    #[error("invalid boolean {value:?}: expected \"true\" or \"false\"")]
    Bool { value: String },
    #[error("invalid port list {value:?}: {reason}")]
    Ports { value: String, reason: PortsError },
    #[error("unknown annotation (value {value:?}); known: {known}", known = ANNOTATIONS.join(", "))]
    UnknownAnnotation { value: String },
}

/// What is wrong with a port list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortsError {
    #[error("no port listed")]
    Empty,
    #[error("empty entry between commas")]
    EmptyEntry,
    #[error("{0:?} is not a port number (1 to 65535)")]
    NotAPort(String),
    #[error("port {0} is listed twice")]
    Duplicate(u16),
    #[error("{0:?}: expected PORT or SHADOW:APP")]
    BadShadow(String),
    #[error("shadow port {0} redirects to itself")]
    SelfRedirect(u16),
    #[error("shadow port {0} is also a wake port ({WAKE_PORTS})")]
    AlsoWakePort(u16),
}

impl Default for NodeDefaults {
    /// Off, `2s`, `60s`, `0`: a node where nobody configured anything is a drop-in runtime.
    fn default() -> Self {
        NodeDefaults {
            enabled: false,
            freeze_after: Some(DEFAULT_FREEZE_AFTER),
            scaledown_after: Some(DEFAULT_SCALEDOWN_AFTER),
            initial_delay: Duration::ZERO,
        }
    }
}

impl NodeDefaults {
    /// The defaults from the runtime options; absent keys keep [`NodeDefaults::default`].
    pub fn from_options(options: &NodeOptions) -> Result<NodeDefaults, SettingsError> {
        let mut defaults = NodeDefaults::default();
        let err = option_error;
        if let Some(on) = options.hibernate {
            defaults.enabled = on;
        }
        if let Some(v) = &options.freeze_after {
            defaults.freeze_after = tier(v).map_err(err(OPTION_FREEZE_AFTER))?;
        }
        if let Some(v) = &options.scaledown_after {
            defaults.scaledown_after = tier(v).map_err(err(OPTION_SCALEDOWN_AFTER))?;
        }
        if let Some(v) = &options.initial_delay {
            defaults.initial_delay = non_negative(v).map_err(err(OPTION_INITIAL_DELAY))?;
        }
        Ok(defaults)
    }
}

impl Settings {
    /// Hibernation off, every other field at its built-in default.
    pub fn disabled() -> Settings {
        Settings::over(&NodeDefaults::default())
    }

    fn over(defaults: &NodeDefaults) -> Settings {
        Settings {
            enabled: defaults.enabled,
            freeze_after: defaults.freeze_after,
            scaledown_after: defaults.scaledown_after,
            initial_delay: defaults.initial_delay,
            wake_ports: None,
            shadow_ports: Vec::new(),
        }
    }

    /// The settings of a container: [`Settings::from_annotations`], except that a pod's
    /// sandbox container is never hibernated. Its annotations (the pod's) are still
    /// validated, so a malformed pod annotation fails the pod at RunPodSandbox, early and
    /// with the annotation named, rather than at its first app container.
    pub fn for_container(
        annotations: &HashMap<String, String>,
        defaults: &NodeDefaults,
    ) -> Result<Settings, SettingsError> {
        let settings = Settings::from_annotations(annotations, defaults)?;
        let sandbox = annotations
            .get(CRI_CONTAINER_TYPE)
            .is_some_and(|t| t == CRI_CONTAINER_TYPE_SANDBOX);
        Ok(if sandbox {
            Settings {
                enabled: false,
                ..settings
            }
        } else {
            settings
        })
    }

    /// Reads the `runc-architect.io/` annotations over `defaults`; every value is
    /// validated, also when hibernation ends up off.
    pub fn from_annotations(
        annotations: &HashMap<String, String>,
        defaults: &NodeDefaults,
    ) -> Result<Settings, SettingsError> {
        // Report problems in a stable order (the map's order is random).
        let mut ours: Vec<(&String, &String)> = annotations
            .iter()
            .filter(|(k, _)| k.starts_with(PREFIX))
            .collect();
        ours.sort();
        let err = annotation_error;
        let mut s = Settings::over(defaults);
        for (key, value) in ours {
            match key.as_str() {
                HIBERNATE => s.enabled = boolean(value).map_err(err(key))?,
                FREEZE_AFTER => s.freeze_after = tier(value).map_err(err(key))?,
                SCALEDOWN_AFTER => s.scaledown_after = tier(value).map_err(err(key))?,
                INITIAL_DELAY => s.initial_delay = non_negative(value).map_err(err(key))?,
                WAKE_PORTS => s.wake_ports = Some(wake_ports(value).map_err(err(key))?),
                SHADOW_PORTS => s.shadow_ports = shadow_ports(value).map_err(err(key))?,
                _ => {
                    return Err(err(key)(ValueError::UnknownAnnotation {
                        value: value.clone(),
                    }))
                }
            }
        }
        if let Some(wake) = &s.wake_ports {
            if let Some(shadow) = s.shadow_ports.iter().find(|sp| wake.contains(&sp.port)) {
                let value = annotations.get(SHADOW_PORTS).cloned().unwrap_or_default();
                return Err(err(SHADOW_PORTS)(ValueError::Ports {
                    value,
                    reason: PortsError::AlsoWakePort(shadow.port),
                }));
            }
        }
        Ok(s)
    }

    /// Whether traffic to `port` is shadow traffic (never activity).
    pub fn is_shadow_port(&self, port: u16) -> bool {
        self.shadow_ports.iter().any(|sp| sp.port == port)
    }
}

fn annotation_error(key: &str) -> impl FnOnce(ValueError) -> SettingsError {
    let key = key.to_string();
    move |problem| SettingsError::Annotation { key, problem }
}

fn option_error(key: &str) -> impl FnOnce(ValueError) -> SettingsError {
    let key = key.to_string();
    move |problem| SettingsError::RuntimeOption { key, problem }
}

/// `"true"` or `"false"`, nothing else (no `1`, `yes`, `True`: one spelling, as documented).
fn boolean(value: &str) -> Result<bool, ValueError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ValueError::Bool {
            value: value.to_string(),
        }),
    }
}

fn non_negative(value: &str) -> Result<Duration, ValueError> {
    duration::parse_non_negative(value).map_err(|reason| ValueError::Duration {
        value: value.to_string(),
        reason,
    })
}

/// A tier's duration: zero turns the tier off.
fn tier(value: &str) -> Result<Option<Duration>, ValueError> {
    non_negative(value).map(|d| (!d.is_zero()).then_some(d))
}

/// The entries of a list separated by commas and/or white space; an empty entry between
/// two commas (or a trailing comma) is an error.
fn entries(value: &str) -> Result<Vec<&str>, PortsError> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for part in value.split(',') {
        let before = out.len();
        out.extend(part.split_whitespace());
        if out.len() == before {
            return Err(PortsError::EmptyEntry);
        }
    }
    Ok(out)
}

fn port(text: &str) -> Result<u16, PortsError> {
    let not_a_port = || PortsError::NotAPort(text.to_string());
    // Digits only: `u16::from_str` would also take a leading `+`.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_a_port());
    }
    match text.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(not_a_port()),
    }
}

fn wake_ports(value: &str) -> Result<Vec<u16>, ValueError> {
    let bad = |reason| ValueError::Ports {
        value: value.to_string(),
        reason,
    };
    let list = entries(value).map_err(bad)?;
    if list.is_empty() {
        return Err(bad(PortsError::Empty));
    }
    let mut seen = BTreeSet::new();
    let mut ports = Vec::with_capacity(list.len());
    for text in list {
        let p = port(text).map_err(bad)?;
        if !seen.insert(p) {
            return Err(bad(PortsError::Duplicate(p)));
        }
        ports.push(p);
    }
    Ok(ports)
}

fn shadow_ports(value: &str) -> Result<Vec<ShadowPort>, ValueError> {
    let bad = |reason| ValueError::Ports {
        value: value.to_string(),
        reason,
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for text in entries(value).map_err(bad)? {
        let shadow = match text.split_once(':') {
            None => ShadowPort {
                port: port(text).map_err(bad)?,
                app: None,
            },
            Some((shadow, app)) => {
                if app.contains(':') {
                    return Err(bad(PortsError::BadShadow(text.to_string())));
                }
                let (port, app) = (port(shadow).map_err(bad)?, port(app).map_err(bad)?);
                if port == app {
                    return Err(bad(PortsError::SelfRedirect(port)));
                }
                ShadowPort {
                    port,
                    app: Some(app),
                }
            }
        };
        if !seen.insert(shadow.port) {
            return Err(bad(PortsError::Duplicate(shadow.port)));
        }
        out.push(shadow);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn read(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::from_annotations(&ann(pairs), &NodeDefaults::default())
    }

    fn message(pairs: &[(&str, &str)]) -> String {
        match read(pairs) {
            Ok(s) => panic!("{pairs:?} accepted as {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn no_annotations_give_the_node_defaults() {
        let s = read(&[]).unwrap();
        assert_eq!(s, Settings::disabled());
        assert!(!s.enabled);
        assert_eq!(s.freeze_after, Some(Duration::from_secs(2)));
        assert_eq!(s.scaledown_after, Some(Duration::from_secs(60)));
        assert_eq!(s.initial_delay, Duration::ZERO);
        assert_eq!(s.wake_ports, None);
        assert!(s.shadow_ports.is_empty());

        let node = NodeDefaults {
            enabled: true,
            freeze_after: None,
            scaledown_after: Some(Duration::from_secs(300)),
            initial_delay: Duration::from_secs(5),
        };
        let s = Settings::from_annotations(&HashMap::new(), &node).unwrap();
        assert!(s.enabled);
        assert_eq!(s.freeze_after, None);
        assert_eq!(s.scaledown_after, Some(Duration::from_secs(300)));
        assert_eq!(s.initial_delay, Duration::from_secs(5));
    }

    #[test]
    fn annotations_override_the_node_defaults() {
        let s = read(&[
            (HIBERNATE, "true"),
            (FREEZE_AFTER, "500ms"),
            (SCALEDOWN_AFTER, "1.5h"),
            (INITIAL_DELAY, "1m30s"),
            (WAKE_PORTS, "8080, 9090"),
            (SHADOW_PORTS, "9100,19090:8080"),
            ("io.kubernetes.cri.container-type", "container"),
            ("unrelated.example/key", "whatever"),
        ])
        .unwrap();
        assert_eq!(
            s,
            Settings {
                enabled: true,
                freeze_after: Some(Duration::from_millis(500)),
                scaledown_after: Some(Duration::from_secs(5400)),
                initial_delay: Duration::from_secs(90),
                wake_ports: Some(vec![8080, 9090]),
                shadow_ports: vec![
                    ShadowPort {
                        port: 9100,
                        app: None
                    },
                    ShadowPort {
                        port: 19090,
                        app: Some(8080)
                    },
                ],
            }
        );
        assert!(s.is_shadow_port(9100) && s.is_shadow_port(19090) && !s.is_shadow_port(8080));

        // "false" turns off what the node turned on.
        let node = NodeDefaults {
            enabled: true,
            ..NodeDefaults::default()
        };
        let s = Settings::from_annotations(&ann(&[(HIBERNATE, "false")]), &node).unwrap();
        assert!(!s.enabled);
    }

    #[test]
    fn zero_turns_a_tier_off() {
        for zero in ["0", "0s", "0ms", "0.0h", "-0"] {
            let s = read(&[(FREEZE_AFTER, zero), (SCALEDOWN_AFTER, zero)]).unwrap();
            assert_eq!(s.freeze_after, None, "{zero}");
            assert_eq!(s.scaledown_after, None, "{zero}");
            let s = read(&[(INITIAL_DELAY, zero)]).unwrap();
            assert_eq!(s.initial_delay, Duration::ZERO);
        }
    }

    #[test]
    fn errors_name_the_annotation_and_the_value() {
        assert_eq!(
            message(&[(FREEZE_AFTER, "2x")]),
            r#"annotation runc-architect.io/freeze-after: invalid duration "2x": unknown unit "x""#
        );
        assert_eq!(
            message(&[(SCALEDOWN_AFTER, "-5m")]),
            r#"annotation runc-architect.io/scaledown-after: invalid duration "-5m": negative"#
        );
        assert_eq!(
            message(&[(INITIAL_DELAY, "")]),
            r#"annotation runc-architect.io/initial-delay: invalid duration "": empty"#
        );
        assert_eq!(
            message(&[(INITIAL_DELAY, "30")]),
            r#"annotation runc-architect.io/initial-delay: invalid duration "30": missing unit (ns, us, ms, s, m, h)"#
        );
        assert_eq!(
            message(&[(HIBERNATE, "yes")]),
            r#"annotation runc-architect.io/hibernate: invalid boolean "yes": expected "true" or "false""#
        );
        assert_eq!(
            message(&[(WAKE_PORTS, "8080,http")]),
            r#"annotation runc-architect.io/wake-ports: invalid port list "8080,http": "http" is not a port number (1 to 65535)"#
        );
        assert_eq!(
            message(&[(SHADOW_PORTS, "9100:9100")]),
            r#"annotation runc-architect.io/shadow-ports: invalid port list "9100:9100": shadow port 9100 redirects to itself"#
        );
        assert_eq!(
            message(&[(WAKE_PORTS, "8080,9100"), (SHADOW_PORTS, "9100")]),
            r#"annotation runc-architect.io/shadow-ports: invalid port list "9100": shadow port 9100 is also a wake port (runc-architect.io/wake-ports)"#
        );
        let unknown = message(&[("runc-architect.io/freze-after", "2s")]);
        assert!(
            unknown.starts_with(
                r#"annotation runc-architect.io/freze-after: unknown annotation (value "2s"); known: runc-architect.io/hibernate, "#
            ),
            "{unknown}"
        );
    }

    #[test]
    fn values_are_validated_while_hibernation_is_off() {
        for (key, value) in [
            (FREEZE_AFTER, "2x"),
            (SCALEDOWN_AFTER, "1d"),
            (INITIAL_DELAY, "-1s"),
            (WAKE_PORTS, "0"),
            (SHADOW_PORTS, "70000"),
            ("runc-architect.io/wake-port", "8080"),
        ] {
            for hibernate in [None, Some("false")] {
                let mut pairs = vec![(key, value)];
                pairs.extend(hibernate.map(|h| (HIBERNATE, h)));
                let err = read(&pairs).unwrap_err();
                let SettingsError::Annotation { key: named, .. } = &err else {
                    panic!("{err:?}");
                };
                assert_eq!(named, key);
                assert!(err.to_string().contains(&format!("{value:?}")), "{err}");
            }
        }
    }

    #[test]
    fn port_lists() {
        let wake = |v: &str| read(&[(WAKE_PORTS, v)]).map(|s| s.wake_ports.unwrap_or_default());
        assert_eq!(wake("8080").unwrap(), [8080]);
        assert_eq!(wake("1,65535").unwrap(), [1, 65535]);
        assert_eq!(wake("80 443").unwrap(), [80, 443]);
        assert_eq!(wake(" 80 ,\t443  8080 ").unwrap(), [80, 443, 8080]);
        assert_eq!(wake("080").unwrap(), [80]);
        for bad in [
            "",
            " ",
            "0",
            "65536",
            "99999999999",
            "-1",
            "+80",
            "80,",
            ",80",
            "80,,443",
            "8080,8080",
            "80 80",
            "8o",
            "80/tcp",
            "19090:8080",
        ] {
            let err = wake(bad).unwrap_err();
            assert!(err.to_string().contains(WAKE_PORTS), "{bad:?}: {err}");
        }
        assert!(wake("8080,8080")
            .unwrap_err()
            .to_string()
            .contains("listed twice"));
        assert!(wake("").unwrap_err().to_string().contains("no port listed"));

        let shadow = |v: &str| read(&[(SHADOW_PORTS, v)]).map(|s| s.shadow_ports);
        assert_eq!(shadow("").unwrap(), []);
        assert_eq!(
            shadow("19090:8080 9100").unwrap(),
            [
                ShadowPort {
                    port: 19090,
                    app: Some(8080)
                },
                ShadowPort {
                    port: 9100,
                    app: None
                }
            ]
        );
        // Two shadows may reach the same app port.
        assert_eq!(shadow("19090:8080,19091:8080").unwrap().len(), 2);
        for bad in [
            "9100,9100",
            "9100,9100:8080",
            "8080:8080",
            "1:2:3",
            ":8080",
            "9100:",
            "9100:0",
            "0:8080",
            "9100,,9101",
            "a:b",
        ] {
            let err = shadow(bad).unwrap_err();
            assert!(err.to_string().contains(SHADOW_PORTS), "{bad:?}: {err}");
        }
        // A shadow port must not also be a wake port; its APP may be one.
        let s = read(&[(WAKE_PORTS, "8080"), (SHADOW_PORTS, "19090:8080")]).unwrap();
        assert_eq!(s.wake_ports, Some(vec![8080]));
        assert!(read(&[(WAKE_PORTS, "8080,19090"), (SHADOW_PORTS, "19090:8080")]).is_err());
    }

    #[test]
    fn the_sandbox_is_never_hibernated() {
        let node_on = NodeDefaults {
            enabled: true,
            ..NodeDefaults::default()
        };
        let sandbox = ann(&[
            (CRI_CONTAINER_TYPE, CRI_CONTAINER_TYPE_SANDBOX),
            (HIBERNATE, "true"),
            (FREEZE_AFTER, "1s"),
        ]);
        let s = Settings::for_container(&sandbox, &node_on).unwrap();
        assert!(!s.enabled);
        assert_eq!(s.freeze_after, Some(Duration::from_secs(1)));

        let app = ann(&[(CRI_CONTAINER_TYPE, "container"), (HIBERNATE, "true")]);
        assert!(
            Settings::for_container(&app, &NodeDefaults::default())
                .unwrap()
                .enabled
        );
        // Outside Kubernetes there is no container type: the annotations decide.
        assert!(
            Settings::for_container(&HashMap::new(), &node_on)
                .unwrap()
                .enabled
        );

        // The sandbox's (pod's) annotations are still validated.
        let bad = ann(&[
            (CRI_CONTAINER_TYPE, CRI_CONTAINER_TYPE_SANDBOX),
            (FREEZE_AFTER, "soon"),
        ]);
        assert!(Settings::for_container(&bad, &node_on).is_err());
    }

    #[test]
    fn node_defaults_from_runtime_options() {
        assert_eq!(
            NodeDefaults::from_options(&NodeOptions::default()).unwrap(),
            NodeDefaults::default()
        );
        let d = NodeDefaults::from_options(&NodeOptions {
            hibernate: Some(true),
            freeze_after: Some("0".into()),
            scaledown_after: Some("2h45m".into()),
            initial_delay: Some("300ms".into()),
        })
        .unwrap();
        assert_eq!(
            d,
            NodeDefaults {
                enabled: true,
                freeze_after: None,
                scaledown_after: Some(Duration::from_secs(2 * 3600 + 45 * 60)),
                initial_delay: Duration::from_millis(300),
            }
        );
        for (options, text) in [
            (
                NodeOptions {
                    freeze_after: Some("2x".into()),
                    ..NodeOptions::default()
                },
                r#"runtime option FreezeAfter: invalid duration "2x": unknown unit "x""#,
            ),
            (
                NodeOptions {
                    scaledown_after: Some("".into()),
                    ..NodeOptions::default()
                },
                r#"runtime option ScaledownAfter: invalid duration "": empty"#,
            ),
            (
                NodeOptions {
                    initial_delay: Some("-1s".into()),
                    ..NodeOptions::default()
                },
                r#"runtime option InitialDelay: invalid duration "-1s": negative"#,
            ),
        ] {
            assert_eq!(
                NodeDefaults::from_options(&options)
                    .unwrap_err()
                    .to_string(),
                text
            );
        }
    }
}
