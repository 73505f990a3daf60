//! The process: environment, working directory, user, hostname, exec.

use anyhow::Result;
use runc_architect_tests::diff::Observation;
use runc_architect_tests::differential::RunCtx;
use serde_json::json;

use crate::util::{failure_facts, ps_facts, sh};
use crate::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "env",
            run: env,
        },
        Scenario {
            name: "cwd",
            run: cwd,
        },
        Scenario {
            name: "user",
            run: user,
        },
        Scenario {
            name: "hostname",
            run: hostname,
        },
        Scenario {
            name: "exec_output_and_codes",
            run: exec_output_and_codes,
        },
        Scenario {
            name: "exec_env_cwd_user",
            run: exec_env_cwd_user,
        },
        Scenario {
            name: "exec_missing_binary",
            run: exec_missing_binary,
        },
        Scenario {
            name: "run_missing_binary",
            run: run_missing_binary,
        },
        Scenario {
            name: "create_then_start",
            run: create_then_start,
        },
        Scenario {
            name: "ps",
            run: ps,
        },
    ]
}

/// Environment from the image and `--env`.
fn env(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let out = ctx.run(
        &[
            "--env",
            "FOO=bar",
            "--env",
            "SPACED=a b  c",
            "--env",
            "EMPTY=",
            "--env",
            "PATH=/bin:/usr/bin",
        ],
        &sh("env | sort"),
    )?;
    o.output("env", &out);
    Ok(o)
}

/// `--cwd`: an existing directory, and one that does not exist yet.
fn cwd(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let out = ctx.run(&["--cwd", "/tmp"], &sh("pwd; ls -a"))?;
    o.output("existing", &out);
    let id = ctx.extra_id("new");
    let out = ctx.run_id(
        &id,
        &["--cwd", "/made/by/runtime"],
        &sh("pwd; stat -c '%a %u' ."),
        None,
    )?;
    o.output("missing", &out);
    let id = ctx.extra_id("default");
    let out = ctx.run_id(&id, &[], &["pwd"], None)?;
    o.output("default", &out);
    Ok(o)
}

/// `--user` as uid:gid, as a name (with supplementary groups from /etc/group), and root.
fn user(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let out = ctx.run(
        &["--user", "1000:1000"],
        &sh("id; echo HOME=$HOME; touch /x 2>&1; echo rc=$?"),
    )?;
    o.output("1000:1000", &out);
    let id = ctx.extra_id("name");
    let out = ctx.run_id(&id, &["--user", "user"], &["id"], None)?;
    o.output("user", &out);
    let id = ctx.extra_id("nobody");
    let out = ctx.run_id(
        &id,
        &["--user", "65534:65534"],
        &sh("id; grep -E '^(Uid|Gid|Groups):' /proc/self/status"),
        None,
    )?;
    o.output("65534", &out);
    let id = ctx.extra_id("root");
    let out = ctx.run_id(&id, &[], &["id"], None)?;
    o.output("root", &out);
    Ok(o)
}

/// `--hostname`, and the default.
fn hostname(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let out = ctx.run(
        &["--hostname", "ra-conformance-host"],
        &sh("hostname; cat /proc/sys/kernel/hostname; uname -n"),
    )?;
    o.output("set", &out);
    let id = ctx.extra_id("default");
    let out = ctx.run_id(
        &id,
        &[],
        &sh("test \"$(hostname)\" = \"$(uname -n)\" && echo consistent"),
        None,
    )?;
    o.output("default", &out);
    Ok(o)
}

/// Exec output, exit codes, and the init still running afterwards.
fn exec_output_and_codes(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    ctx.run_detached(ctx.id(), &[], &["sleep", "1000"])?;
    ctx.wait_status(ctx.id(), "RUNNING")?;
    for (i, code) in ["0", "7", "255"].iter().enumerate() {
        let out = ctx.ctr().run(&[
            "tasks",
            "exec",
            "--exec-id",
            &format!("e{i}"),
            ctx.id(),
            "sh",
            "-c",
            &format!("echo out-{code}; echo err-{code} >&2; exit {code}"),
        ])?;
        o.output(&format!("exec exit {code}"), &out);
    }
    let out = ctx.ctr().run_input(
        &["tasks", "exec", "--exec-id", "cat", ctx.id(), "cat"],
        b"piped into exec\n",
    )?;
    o.output("exec stdin", &out);
    o.put("status after", json!(ctx.ctr().task_status(ctx.id())?));
    Ok(o)
}

/// Exec with `--cwd`, `--user`, and an environment set by `env`.
fn exec_env_cwd_user(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    ctx.run_detached(ctx.id(), &["--env", "FROM_RUN=1"], &["sleep", "1000"])?;
    ctx.wait_status(ctx.id(), "RUNNING")?;
    let c = ctx.ctr();
    o.output(
        "cwd",
        &c.run(&[
            "tasks",
            "exec",
            "--exec-id",
            "a",
            "--cwd",
            "/etc",
            ctx.id(),
            "pwd",
        ])?,
    );
    o.output(
        "user",
        &c.run(&[
            "tasks",
            "exec",
            "--exec-id",
            "b",
            "--user",
            "1000",
            ctx.id(),
            "id",
        ])?,
    );
    o.output(
        "env",
        &c.run(&[
            "tasks",
            "exec",
            "--exec-id",
            "c",
            ctx.id(),
            "sh",
            "-c",
            "echo FROM_RUN=$FROM_RUN; env -i X=1 sh -c 'env | sort'",
        ])?,
    );
    Ok(o)
}

/// Exec of a binary that does not exist: ctr's exit code and an error that names it.
///
/// Not compared word for word: the message comes from runc through the shim; what must hold
/// is the exit code, that the binary is named, that it says "not found"/"no such file", and
/// the error class. The task keeps running.
fn exec_missing_binary(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    ctx.run_detached(ctx.id(), &[], &["sleep", "1000"])?;
    ctx.wait_status(ctx.id(), "RUNNING")?;
    let c = ctx.ctr();
    let out = c.run(&[
        "tasks",
        "exec",
        "--exec-id",
        "m1",
        ctx.id(),
        "/no/such/binary",
    ])?;
    o.put("absolute path", failure_facts(&out, &["/no/such/binary"]));
    let out = c.run(&[
        "tasks",
        "exec",
        "--exec-id",
        "m2",
        ctx.id(),
        "nosuchcommand",
    ])?;
    o.put("PATH lookup", failure_facts(&out, &["nosuchcommand"]));
    // The exec id is free again and the container unharmed.
    let out = c.run(&[
        "tasks",
        "exec",
        "--exec-id",
        "m1",
        ctx.id(),
        "echo",
        "still-fine",
    ])?;
    o.output("exec after", &out);
    o.put("status after", json!(c.task_status(ctx.id())?));
    Ok(o)
}

/// `ctr run` of a binary that does not exist.
fn run_missing_binary(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let out = ctx.run(&[], &["/no/such/init"])?;
    o.put("run", failure_facts(&out, &["/no/such/init"]));
    o.put("task listed after", json!(ctx.ctr().task_status(ctx.id())?));
    Ok(o)
}

/// `ctr containers create` then an attached `ctr tasks start`: output and exit code.
fn create_then_start(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let c = ctx.ctr();
    let out = c.run(&[
        "containers",
        "create",
        "--runtime",
        ctx.runtime_type(),
        ctx.image(),
        ctx.id(),
        "sh",
        "-c",
        "echo started; echo on-err >&2; exit 4",
    ])?;
    o.output("create", &out);
    o.put("task before start", json!(c.task_status(ctx.id())?));
    let out = c.run(&["tasks", "start", ctx.id()])?;
    o.output("start", &out);
    o.put("task after exit", json!(c.task_status(ctx.id())?));
    o.output("tasks rm", &c.run(&["tasks", "rm", ctx.id()])?);
    o.output("containers rm", &c.run(&["containers", "rm", ctx.id()])?);
    Ok(o)
}

/// `ctr tasks ps`: the processes of a container (count, init listed), growing with an exec.
fn ps(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    ctx.run_detached(
        ctx.id(),
        &[],
        &sh("sleep 1001 & sleep 1002 & touch /tmp/ready; wait"),
    )?;
    ctx.wait_status(ctx.id(), "RUNNING")?;
    let c = ctx.ctr();
    let pid = c.task_pid(ctx.id())?;
    // The init forks its children right after start: wait for them to show.
    let out = wait_ps(ctx, 3)?;
    o.put("ps", ps_facts(&out, pid));
    let bg = c.spawn(&[
        "tasks",
        "exec",
        "--exec-id",
        "ps-exec",
        ctx.id(),
        "sleep",
        "1003",
    ])?;
    let out = wait_ps(ctx, 4)?;
    o.put("ps with exec", ps_facts(&out, pid));
    drop(bg);
    Ok(o)
}

fn wait_ps(ctx: &RunCtx, want: usize) -> Result<runc_architect_tests::Output> {
    let mut last = None;
    let r = runc_architect_tests::poll::try_wait_for(
        &format!("ctr tasks ps to list {want} processes"),
        crate::util::WAIT,
        || {
            let out = ctx.ctr().run(&["tasks", "ps", ctx.id()])?;
            let n = out
                .stdout_str()
                .lines()
                .skip(1)
                .filter(|l| !l.trim().is_empty())
                .count();
            let done = n == want;
            last = Some(out.clone());
            Ok(done.then_some(out))
        },
    );
    r.map_err(|e| anyhow::anyhow!("{e}; last: {last:?}"))
}
