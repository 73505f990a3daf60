//! Bad input gets a clear error and nothing else breaks.
//!
//! Each test talks to a shim directly over ttrpc (started the way containerd starts it, see
//! `runc_architect_tests::shim`), because the exact status code matters and because ctr cannot
//! send most of these requests. Per test and per shim (containerd's stock `runc.v2` shim of the
//! version, and runc-architect):
//!
//! 1. start the shim for a healthy container and run it (`sleep`);
//! 2. send the bad request (for another container id in the same shim, or about a process
//!    that is gone) and record the ttrpc status code and message;
//! 3. prove the shim still serves the healthy container (State, an Exec that exits 7, Pids).
//!
//! The stock shim's code is asserted to be the documented one ([`Case::stock_code`]), and
//! runc-architect must answer with the same code (or, where [`Case::deliberate`] documents a
//! deliberate difference, that code) and a message that names the problem ([`Case::mentions`],
//! any of them, case-insensitive). A trial per (containerd version, case).
//!
//! What the stock shim answers (containerd 1.7 and 2.1 alike):
//!
//! | case | stock code | stock message |
//! | --- | --- | --- |
//! | malformed config.json | UNKNOWN | OCI runtime create failed: runc create failed: invalid character ... |
//! | missing bundle | NOT_FOUND | open <bundle>/options.json: no such file or directory |
//! | missing rootfs | UNKNOWN | ... runc create failed: invalid rootfs: stat <bundle>/rootfs: no such file or directory |
//! | unknown runtime options type | UNKNOWN | type with url <url>: not found |
//! | malformed runtime options | UNKNOWN | proto: cannot parse invalid wire-format data |
//! | start of a running task | UNKNOWN | cannot start a running process |
//! | delete of a running task | UNKNOWN | cannot delete a running process |
//! | kill of an exited init | NOT_FOUND | process already finished: not found |
//! | kill of an exited exec | NOT_FOUND | process already finished: not found |
//! | exec with a taken exec id | ALREADY_EXISTS | id <exec id>: already exists |
//! | two concurrent Creates of one id (the loser) | UNKNOWN | ... container with id exists ... |
//! | state of an unknown container | NOT_FOUND | container not created: not found |
//! | exec in an unknown container | NOT_FOUND | container not created: not found |
//!
//! Deliberate differences of runc-architect: unknown and malformed runtime options answer
//! INVALID_ARGUMENT (see the cases).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use libtest_mimic::{Failed, Trial};
use runc_architect_tests::image::{ImageBuilder, BUSYBOX_IMAGE};
use runc_architect_tests::paths::{self, Runtime};
use runc_architect_tests::shim::{write_bundle, RpcError, ShimProcess, RUNC_OPTIONS_TYPE_URL};
use runc_architect_tests::spec::default_spec;
use runc_architect_tests::suite;
use runc_architect_tests::{Containerd, Version};

/// One version's shared pieces: a daemon (the shims publish their events to it), the shim
/// binaries, the test image's files.
struct Env {
    containerd: Containerd,
    namespace: String,
    image: ImageBuilder,
    stock: PathBuf,
    architect: PathBuf,
}

impl Env {
    fn start(version: Version) -> Result<Env> {
        version.check_installed()?;
        let architect = paths::architect_shim(version)?;
        let containerd = Containerd::start(version)?;
        let namespace = format!("ra-bad-{}", containerd.unique());
        Ok(Env {
            namespace,
            image: ImageBuilder::busybox(BUSYBOX_IMAGE)?,
            stock: version.stock_shim_bin(),
            architect,
            containerd,
        })
    }

    fn binary(&self, rt: Runtime) -> &Path {
        match rt {
            Runtime::Stock => &self.stock,
            Runtime::Architect => &self.architect,
        }
    }
}

/// What a case gets: the shim (already serving the healthy container) and helpers.
struct Session<'a> {
    env: &'a Env,
    shim: ShimProcess,
    /// Prefix of this run's container ids.
    prefix: String,
    dir: PathBuf,
}

impl Session<'_> {
    /// A container id of this run.
    fn id(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Writes a valid bundle (rootfs included) for container `name` running `args`.
    fn bundle(&self, name: &str, args: &[&str]) -> Result<PathBuf> {
        let id = self.id(name);
        let dir = self.dir.join(&id);
        let spec = default_spec("rootfs", args, &format!("/{}/{id}", self.env.namespace));
        write_bundle(&dir, &spec, Some(&self.env.image))?;
        Ok(dir)
    }

    /// Creates and starts container `name` running `args`.
    fn run(&mut self, name: &str, args: &[&str]) -> Result<String> {
        let bundle = self.bundle(name, args)?;
        let id = self.id(name);
        self.shim.run(&id, &bundle)?;
        Ok(id)
    }
}

/// The outcome of the bad request.
fn expect_err<T: std::fmt::Debug>(what: &str, r: Result<T, RpcError>) -> Result<RpcError> {
    match r {
        Err(e) => Ok(e),
        Ok(v) => bail!("{what} succeeded ({v:?}) but must fail"),
    }
}

struct Case {
    name: &'static str,
    /// The ttrpc code containerd's stock shim answers with (checked, so the table below stays
    /// true).
    stock_code: &'static str,
    /// A deliberate difference: the code runc-architect answers instead of the stock one, and
    /// why. `None`: the same code as the stock shim.
    deliberate: Option<(&'static str, &'static str)>,
    /// The message must contain one of these (case-insensitive).
    mentions: &'static [&'static str],
    run: fn(&mut Session) -> Result<RpcError>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "malformed_config_json",
            deliberate: None,
            stock_code: "UNKNOWN",
            mentions: &[
                "config.json",
                "json",
                "invalid character",
                "unmarshal",
                "parse",
                "syntax",
                "decode",
            ],
            run: |s| {
                let dir = s.dir.join(s.id("badjson"));
                let spec = default_spec("rootfs", &["true"], "/x");
                write_bundle(&dir, &spec, Some(&s.env.image))?;
                std::fs::write(
                    dir.join("config.json"),
                    b"{ \"ociVersion\": \"1.1.0\", this is not json",
                )?;
                let id = s.id("badjson");
                expect_err("Create", s.shim.create(&id, &dir, None))
            },
        },
        Case {
            name: "missing_bundle",
            deliberate: None,
            stock_code: "NOT_FOUND",
            mentions: &["no such file", "not found", "does not exist", "bundle"],
            run: |s| {
                let dir = s.dir.join("no-such-bundle");
                let id = s.id("nobundle");
                expect_err("Create", s.shim.create(&id, &dir, None))
            },
        },
        Case {
            name: "missing_rootfs",
            deliberate: None,
            stock_code: "UNKNOWN",
            mentions: &["rootfs", "no such file", "not found", "does not exist"],
            run: |s| {
                let id = s.id("norootfs");
                let dir = s.dir.join(&id);
                let spec = default_spec("rootfs", &["true"], &format!("/{}/{id}", s.env.namespace));
                write_bundle(&dir, &spec, None)?;
                expect_err("Create", s.shim.create(&id, &dir, None))
            },
        },
        Case {
            name: "unknown_runtime_options",
            deliberate: Some((
                "INVALID_ARGUMENT",
                "containerd's stock shim passes the typeurl/protobuf error through unmapped (UNKNOWN); \
                 runc-architect names the caller's mistake: INVALID_ARGUMENT, the code issue 2 asks \
                 for. ctr and CRI users see an error on Create either way.",
            )),
            stock_code: "UNKNOWN",
            mentions: &[
                "runc-architect.test/NoSuchOptions",
                "type",
                "not found",
                "unknown",
            ],
            run: |s| {
                let dir = s.bundle("unkopts", &["true"])?;
                let opts = Any {
                    type_url: "runc-architect.test/NoSuchOptions".into(),
                    value: vec![0x0a, 0x03, b'a', b'b', b'c'],
                    ..Default::default()
                };
                let id = s.id("unkopts");
                expect_err("Create", s.shim.create(&id, &dir, Some(opts)))
            },
        },
        Case {
            name: "malformed_runtime_options",
            deliberate: Some((
                "INVALID_ARGUMENT",
                "containerd's stock shim passes the typeurl/protobuf error through unmapped (UNKNOWN); \
                 runc-architect names the caller's mistake: INVALID_ARGUMENT, the code issue 2 asks \
                 for. ctr and CRI users see an error on Create either way.",
            )),
            stock_code: "UNKNOWN",
            mentions: &["proto", "unmarshal", "invalid", "decode", "options"],
            run: |s| {
                let dir = s.bundle("badopts", &["true"])?;
                let opts = Any {
                    type_url: RUNC_OPTIONS_TYPE_URL.into(),
                    // A length-delimited field whose length runs past the end.
                    value: vec![0x32, 0x7f, b'x'],
                    ..Default::default()
                };
                let id = s.id("badopts");
                expect_err("Create", s.shim.create(&id, &dir, Some(opts)))
            },
        },
        Case {
            name: "start_twice",
            deliberate: None,
            stock_code: "UNKNOWN",
            mentions: &["running", "already", "started", "state"],
            run: |s| {
                let id = s.run("twice", &["sleep", "1000"])?;
                expect_err("second Start", s.shim.start(&id, ""))
            },
        },
        Case {
            name: "delete_running_task",
            deliberate: None,
            stock_code: "UNKNOWN",
            mentions: &["running", "stopped", "not stopped"],
            run: |s| {
                let id = s.run("victim", &["sleep", "1000"])?;
                let e = expect_err("Delete of a running task", s.shim.delete(&id, ""))?;
                let st = s
                    .shim
                    .status(&id, "")
                    .map_err(|e| anyhow!("State after: {e}"))?;
                if st != "RUNNING" {
                    bail!("after the refused Delete the task is {st}, not RUNNING");
                }
                Ok(e)
            },
        },
        Case {
            name: "kill_exited_init",
            deliberate: None,
            stock_code: "NOT_FOUND",
            mentions: &["finished", "not found", "not running", "exited"],
            run: |s| {
                let id = s.run("exited", &["true"])?;
                s.shim.wait(&id, "").map_err(|e| anyhow!("Wait: {e}"))?;
                expect_err("Kill of an exited init", s.shim.kill(&id, "", 15, false))
            },
        },
        Case {
            name: "kill_exited_exec",
            deliberate: None,
            stock_code: "NOT_FOUND",
            mentions: &["finished", "not found", "not running", "exited"],
            run: |s| {
                let id = s.run("execgone", &["sleep", "1000"])?;
                s.shim
                    .exec(&id, "e1", &["true"])
                    .map_err(|e| anyhow!("Exec: {e}"))?;
                s.shim
                    .start(&id, "e1")
                    .map_err(|e| anyhow!("Start exec: {e}"))?;
                s.shim
                    .wait(&id, "e1")
                    .map_err(|e| anyhow!("Wait exec: {e}"))?;
                expect_err("Kill of an exited exec", s.shim.kill(&id, "e1", 15, false))
            },
        },
        Case {
            name: "exec_id_taken",
            deliberate: None,
            stock_code: "ALREADY_EXISTS",
            mentions: &["dup", "already exists"],
            run: |s| {
                let id = s.run("dupexec", &["sleep", "1000"])?;
                s.shim
                    .exec(&id, "dup", &["sleep", "1000"])
                    .map_err(|e| anyhow!("first Exec: {e}"))?;
                s.shim
                    .start(&id, "dup")
                    .map_err(|e| anyhow!("Start exec: {e}"))?;
                expect_err("Exec with a taken id", s.shim.exec(&id, "dup", &["true"]))
            },
        },
        Case {
            name: "concurrent_create_same_id",
            deliberate: None,
            stock_code: "UNKNOWN",
            mentions: &["exists"],
            run: |s| {
                // Two Creates of one id at the same moment (a retried request racing the
                // first): one wins, and the loser must leave the winner whole, rootfs and
                // state included.
                let bundle = s.bundle("twin", &["sleep", "1000"])?;
                let id = s.id("twin");
                let req = s.shim.create_template(&id, &bundle);
                s.shim.note_created(&id);
                let (a, b) = s.shim.call_concurrently::<_, api::CreateTaskResponse>(
                    "Create", &req, &req,
                );
                let loser = match (a, b) {
                    (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
                    (Ok(_), Ok(_)) => bail!("both Creates of {id} succeeded"),
                    (Err(a), Err(b)) => bail!("both Creates of {id} failed: {a}; {b}"),
                };
                s.shim
                    .start(&id, "")
                    .map_err(|e| anyhow!("Start of the winner after the race: {e}"))?;
                s.shim
                    .check_serves(&id, "twin-probe")
                    .context("the winner of the race")?;
                let marker = s.shim.exec_output(&id, "twin-ls", &["test", "-f", "/etc/image-marker"]);
                match marker {
                    Ok(0) => {}
                    other => bail!("the winner's rootfs is gone after the race: {other:?}"),
                }
                Ok(loser)
            },
        },
        Case {
            name: "unknown_container",
            deliberate: None,
            stock_code: "NOT_FOUND",
            mentions: &["not found", "does not exist", "nosuchcontainer"],
            run: |s| {
                let id = s.id("nosuchcontainer");
                expect_err("State of an unknown container", s.shim.state(&id, ""))
            },
        },
        Case {
            name: "exec_in_unknown_container",
            deliberate: None,
            stock_code: "NOT_FOUND",
            mentions: &["not found", "does not exist", "nosuchcontainer"],
            run: |s| {
                let id = s.id("nosuchcontainer");
                expect_err(
                    "Exec in an unknown container",
                    s.shim.exec(&id, "x", &["true"]),
                )
            },
        },
    ]
}

/// Runs `case` against one shim: healthy container, bad request, health check.
fn run_case(env: &Env, case: &Case, rt: Runtime) -> Result<RpcError> {
    let prefix = format!("{}-{}", case.name.replace('_', "-"), rt.tag());
    let dir = env.containerd.scratch_dir(&format!("bad-{prefix}"))?;
    let good = format!("{prefix}-good");
    let good_bundle = dir.join(&good);
    let spec = default_spec(
        "rootfs",
        &["sleep", "1000"],
        &format!("/{}/{good}", env.namespace),
    );
    write_bundle(&good_bundle, &spec, Some(&env.image))?;
    let shim = ShimProcess::launch(
        env.binary(rt),
        &env.containerd,
        &env.namespace,
        &good,
        &good_bundle,
    )?;
    let mut s = Session {
        env,
        shim,
        prefix,
        dir,
    };
    s.shim.run(&good, &good_bundle)?;
    let answer = (case.run)(&mut s).with_context(|| format!("shim log:\n{}", s.shim.log()))?;
    s.shim
        .check_serves(&good, "probe")
        .with_context(|| format!("after answering {answer}, the shim no longer serves its healthy container; shim log:\n{}", s.shim.log()))?;
    Ok(answer)
}

fn check(env: &Env, case: &Case) -> Result<()> {
    let stock = run_case(env, case, Runtime::Stock).context("with the stock shim")?;
    let arch = run_case(env, case, Runtime::Architect).context("with runc-architect")?;
    if std::env::var_os("RA_SHOW_OBSERVATIONS").is_some() {
        eprintln!(
            "{} on {}:\n  stock:          {stock}\n  runc-architect: {arch}",
            case.name,
            env.containerd.version()
        );
    }
    let mut problems = Vec::new();
    if stock.code != case.stock_code {
        problems.push(format!(
            "the stock shim answered {stock}, expected code {} (update the table if containerd changed)",
            case.stock_code
        ));
    }
    match case.deliberate {
        None if arch.code != stock.code => problems.push(format!(
            "runc-architect answered code {} where the stock shim answers {}",
            arch.code, stock.code
        )),
        Some((code, why)) if arch.code != code && arch.code != stock.code => {
            problems.push(format!(
                "runc-architect answered code {}; expected {code} (a deliberate difference: {why}) \
                 or the stock shim's {}",
                arch.code, stock.code
            ))
        }
        _ => {}
    }
    for (who, e) in [("stock", &stock), ("runc-architect", &arch)] {
        let m = e.message.to_lowercase();
        if !case.mentions.iter().any(|w| m.contains(&w.to_lowercase())) {
            problems.push(format!(
                "{who}'s message {:?} names none of {:?}",
                e.message, case.mentions
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "{}\n  stock:          {stock}\n  runc-architect: {arch}",
            problems.join("\n")
        )
    }
}

fn main() {
    suite::run_per_version(Env::start, |version, env| {
        cases()
            .into_iter()
            .map(|case| {
                let env = env.clone();
                Trial::test(
                    format!("{version}::{}", case.name),
                    move || -> Result<(), Failed> {
                        let e = env.get()?;
                        check(&e, &case).map_err(|e| Failed::from(format!("{e:#}")))
                    },
                )
            })
            .collect()
    })
}
