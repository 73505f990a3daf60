//! Task lifecycle: signals, pause/resume, stats, OOM, delete, events, error answers.

use anyhow::{Context, Result};
use runc_architect_tests::diff::Observation;
use runc_architect_tests::differential::RunCtx;
use runc_architect_tests::Version;
use serde_json::{json, Value};

use crate::util::{
    error_class, event_summary, failure_facts, host_dir, json_shape, num_at, sh, topics, wait_file,
    WAIT,
};
use crate::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "kill_signals",
            run: kill_signals,
        },
        Scenario {
            name: "kill_all",
            run: kill_all,
        },
        Scenario {
            name: "pause_resume",
            run: pause_resume,
        },
        Scenario {
            name: "metrics",
            run: metrics,
        },
        Scenario {
            name: "oom_kill",
            run: oom_kill,
        },
        Scenario {
            name: "delete_stopped",
            run: delete_stopped,
        },
        Scenario {
            name: "delete_running",
            run: delete_running,
        },
        Scenario {
            name: "events_of_a_run",
            run: events_of_a_run,
        },
        Scenario {
            name: "exec_events",
            run: exec_events,
        },
        Scenario {
            name: "task_list",
            run: task_list,
        },
        Scenario {
            name: "exec_id_taken",
            run: exec_id_taken,
        },
        Scenario {
            name: "signal_exited_process",
            run: signal_exited_process,
        },
        Scenario {
            name: "start_twice",
            run: start_twice,
        },
    ]
}

/// The events of the main container from creation to deletion: task events in order, and
/// container events in order. (The shim publishes /tasks/delete while containerd publishes
/// /containers/delete; which arrives first is not the shim's choice.)
///
/// /tasks/delete is compared on containerd 1.7 only: with containerd 2.1 the stock shim
/// publishes it itself while it shuts down, and it is sometimes lost (seen in stock-vs-stock
/// runs), so its presence there says nothing about the runtime.
fn whole_life_events(ctx: &RunCtx) -> Result<Value> {
    let with_task_delete = ctx.version() == Version::V1_7;
    if with_task_delete {
        ctx.wait_event(ctx.id(), "/tasks/delete")?;
    }
    ctx.wait_event(ctx.id(), "/containers/delete")?;
    let evs: Vec<_> = ctx
        .events_of(ctx.id())
        .into_iter()
        .filter(|e| with_task_delete || e.topic != "/tasks/delete")
        .collect();
    let (tasks, others): (Vec<_>, Vec<_>) = evs
        .into_iter()
        .partition(|e| e.topic.starts_with("/tasks/"));
    Ok(json!({
        "task events": event_summary(&tasks),
        "other events": event_summary(&others),
    }))
}

/// A host directory bind-mounted at /sig for readiness files, and its `--mount` flag.
fn sig_mount(ctx: &RunCtx, name: &str) -> Result<(std::path::PathBuf, String)> {
    let d = host_dir(ctx.scratch(), name, &[])?;
    let flag = format!("type=bind,src={},dst=/sig,options=rbind:rw", d.display());
    Ok((d, flag))
}

/// `ctr tasks kill` with SIGTERM, SIGUSR1 (trapped) and SIGKILL ("9") while `ctr run` is
/// attached: what the attached ctr printed and its exit code.
fn kill_signals(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let (dir, mount) = sig_mount(ctx, "sig")?;
    for (case, signal) in [("term", "SIGTERM"), ("usr1", "SIGUSR1"), ("kill", "9")] {
        let id = ctx.extra_id(case);
        let script = format!(
            "trap 'echo got-term; exit 42' TERM; trap 'echo got-usr1; exit 10' USR1; \
             echo ready; touch /sig/{case}; while :; do sleep 0.05; done"
        );
        let args = ctx.run_args(&id, &["--rm", "--mount", &mount], &sh(&script));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let bg = ctx.ctr().spawn(&args)?;
        wait_file(&dir.join(case))?;
        let kill = ctx.ctr().run(&["tasks", "kill", "--signal", signal, &id])?;
        o.output(&format!("{case}: kill"), &kill);
        let out = bg.wait(WAIT)?;
        o.output(&format!("{case}: run"), &out);
    }
    Ok(o)
}

/// `ctr tasks kill --all` reaches every process of the container, execs included; the exit
/// events come in the same order (execs before init).
fn kill_all(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let (dir, mount) = sig_mount(ctx, "sig")?;
    ctx.run_detached(
        ctx.id(),
        &["--mount", &mount],
        &sh("sleep 1001 & sleep 1002 & touch /sig/ready; wait"),
    )?;
    wait_file(&dir.join("ready"))?;
    let c = ctx.ctr();
    o.output(
        "exec -d",
        &c.run(&[
            "tasks",
            "exec",
            "-d",
            "--exec-id",
            "bg1",
            ctx.id(),
            "sleep",
            "1003",
        ])?,
    );
    let mark = ctx.events().mark();
    o.output(
        "kill --all",
        &c.run(&["tasks", "kill", "--all", "--signal", "SIGKILL", ctx.id()])?,
    );
    ctx.wait_event(ctx.id(), "/tasks/exit")
        .and_then(|_| {
            ctx.events().wait_for(WAIT, |e| {
                e.seq >= mark
                    && e.topic == "/tasks/exit"
                    && e.container_id() == Some(ctx.id())
                    && e.str_field("id") == Some(ctx.id())
            })
        })
        .context("init exit")?;
    ctx.wait_status(ctx.id(), "STOPPED")?;
    let evs: Vec<_> = ctx
        .events()
        .since(mark)
        .into_iter()
        .filter(|e| e.container_id() == Some(ctx.id()))
        .collect();
    o.put("events", event_summary(&evs));
    o.put("status", json!(c.task_status(ctx.id())?));
    Ok(o)
}

/// Pause and resume: `ctr tasks ls` states, events, and pausing/resuming twice.
fn pause_resume(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    ctx.run_detached(ctx.id(), &[], &["sleep", "1000"])?;
    ctx.wait_status(ctx.id(), "RUNNING")?;
    let c = ctx.ctr();
    let mark = ctx.events().mark();
    o.output("pause", &c.run(&["tasks", "pause", ctx.id()])?);
    o.put("status paused", json!(c.task_status(ctx.id())?));
    let again = c.run(&["tasks", "pause", ctx.id()])?;
    o.put(
        "pause again",
        json!({ "code": again.code, "class": error_class(&again.stderr_str()) }),
    );
    o.output("resume", &c.run(&["tasks", "resume", ctx.id()])?);
    o.put("status resumed", json!(c.task_status(ctx.id())?));
    let again = c.run(&["tasks", "resume", ctx.id()])?;
    o.put(
        "resume again",
        json!({ "code": again.code, "class": error_class(&again.stderr_str()) }),
    );
    o.output(
        "exec after resume",
        &c.run(&["tasks", "exec", "--exec-id", "x", ctx.id(), "echo", "alive"])?,
    );
    ctx.wait_event(ctx.id(), "/tasks/resumed")?;
    let evs: Vec<_> = ctx
        .events()
        .since(mark)
        .into_iter()
        .filter(|e| e.container_id() == Some(ctx.id()))
        .collect();
    o.put("events", json!(topics(&evs)));
    Ok(o)
}

/// `ctr tasks metrics`: the same metrics (names and JSON shape), with plausible values.
fn metrics(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let (dir, mount) = sig_mount(ctx, "sig")?;
    // Use some CPU first, so the CPU counters are not 0.
    ctx.run_detached(
        ctx.id(),
        &["--mount", &mount],
        &sh("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
             sleep 1001 & touch /sig/ready; exec sleep 1000"),
    )?;
    wait_file(&dir.join("ready"))?;
    let c = ctx.ctr();
    let table = c.run(&["tasks", "metrics", ctx.id()])?;
    let names: Vec<String> = table
        .stdout_str()
        .lines()
        .skip_while(|l| !l.starts_with("METRIC"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    o.put(
        "table",
        json!({ "code": table.code, "stderr": table.stderr_str(), "metrics": names }),
    );
    let out = c.run(&["tasks", "metrics", "--format", "json", ctx.id()])?;
    let v: Value =
        serde_json::from_str(&out.stdout_str()).with_context(|| format!("metrics JSON: {out}"))?;
    o.put("json shape", json_shape(&v));
    // cgroup v1 (this machine's hybrid layout) and v2 name them differently.
    let mem = num_at(&v, "/memory/usage/usage").or_else(|| num_at(&v, "/memory/usage"));
    let pids = num_at(&v, "/pids/current");
    let cpu = num_at(&v, "/cpu/usage/total").or_else(|| num_at(&v, "/cpu/usage_usec"));
    let mem_limit = num_at(&v, "/memory/usage/limit").or_else(|| num_at(&v, "/memory/usage_limit"));
    o.put(
        "plausible",
        json!({
            "memory usage > 0": mem.is_some_and(|m| m > 0.0),
            "pids current >= 1": pids.is_some_and(|p| p >= 1.0),
            "cpu usage > 0": cpu.is_some_and(|c| c > 0.0),
            "memory limit > 0": mem_limit.is_some_and(|m| m > 0.0),
        }),
    );
    Ok(o)
}

/// A container over its memory limit: OOM-killed, exit status 137, an oom event.
fn oom_kill(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    // busybox tail keeps a newline-free input in memory: it grows until the kernel kills it.
    let out = ctx.run(&["--memory-limit", "33554432"], &["tail", "/dev/zero"])?;
    o.output("run", &out);
    ctx.wait_event(ctx.id(), "/tasks/exit")?;
    let evs = ctx.events_of(ctx.id());
    let exit = evs.iter().find(|e| e.topic == "/tasks/exit");
    o.put(
        "oom event",
        json!(evs.iter().any(|e| e.topic == "/tasks/oom")),
    );
    o.put(
        "exit status",
        json!(exit.map(|e| e.u64_field("exit_status"))),
    );
    Ok(o)
}

/// Delete of a stopped task and its container.
fn delete_stopped(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    ctx.run_detached(ctx.id(), &[], &sh("echo bye; exit 3"))?;
    ctx.wait_status(ctx.id(), "STOPPED")?;
    let c = ctx.ctr();
    o.output("tasks rm", &c.run(&["tasks", "rm", ctx.id()])?);
    o.put("task listed", json!(c.task_status(ctx.id())?));
    o.output("containers rm", &c.run(&["containers", "rm", ctx.id()])?);
    o.put(
        "container listed",
        json!(c.containers()?.iter().any(|x| x == ctx.id())),
    );
    o.put("events", whole_life_events(ctx)?);
    Ok(o)
}

/// Delete of a running task: refused without --force, done with it (SIGKILL, status 137);
/// the container cannot be removed while its task runs.
fn delete_running(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    ctx.run_detached(ctx.id(), &[], &["sleep", "1000"])?;
    ctx.wait_status(ctx.id(), "RUNNING")?;
    let c = ctx.ctr();
    o.output("tasks rm", &c.run(&["tasks", "rm", ctx.id()])?);
    o.output("containers rm", &c.run(&["containers", "rm", ctx.id()])?);
    o.put("status", json!(c.task_status(ctx.id())?));
    o.output("tasks rm -f", &c.run(&["tasks", "rm", "-f", ctx.id()])?);
    o.put("task listed", json!(c.task_status(ctx.id())?));
    o.output(
        "containers rm after",
        &c.run(&["containers", "rm", ctx.id()])?,
    );
    o.put("events", whole_life_events(ctx)?);
    Ok(o)
}

/// The events of a whole `ctr run --rm`, in order, with exit statuses.
fn events_of_a_run(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let out = ctx.run(&[], &sh("exit 5"))?;
    o.output("run", &out);
    o.put("events", whole_life_events(ctx)?);
    Ok(o)
}

/// The events of an exec: added, started, exit with the exec id and status.
fn exec_events(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    ctx.run_detached(ctx.id(), &[], &["sleep", "1000"])?;
    ctx.wait_status(ctx.id(), "RUNNING")?;
    let mark = ctx.events().mark();
    let out = ctx.ctr().run(&[
        "tasks",
        "exec",
        "--exec-id",
        "ev1",
        ctx.id(),
        "sh",
        "-c",
        "exit 3",
    ])?;
    o.output("exec", &out);
    // A barrier: the shim publishes in order, so once the exit of a later exec is seen,
    // every event of the first one is in.
    ctx.ctr()
        .ok(&["tasks", "exec", "--exec-id", "barrier", ctx.id(), "true"])?;
    ctx.events().wait_for(WAIT, |e| {
        e.seq >= mark && e.topic == "/tasks/exit" && e.str_field("id") == Some("barrier")
    })?;
    let evs: Vec<_> = ctx
        .events()
        .since(mark)
        .into_iter()
        .filter(|e| e.container_id() == Some(ctx.id()))
        .take_while(|e| e.str_field("exec_id") != Some("barrier"))
        .collect();
    o.put("events", event_summary(&evs));
    Ok(o)
}

/// `ctr tasks ls`: a running, a paused and a stopped task (pids not compared, only > 0).
fn task_list(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let running = ctx.extra_id("run");
    let paused = ctx.extra_id("pause");
    let stopped = ctx.extra_id("stop");
    ctx.run_detached(&running, &[], &["sleep", "1000"])?;
    ctx.run_detached(&paused, &[], &["sleep", "1000"])?;
    ctx.run_detached(&stopped, &[], &["true"])?;
    ctx.wait_status(&running, "RUNNING")?;
    ctx.wait_status(&paused, "RUNNING")?;
    ctx.ctr().ok(&["tasks", "pause", &paused])?;
    ctx.wait_status(&stopped, "STOPPED")?;
    let mut rows: Vec<Value> = ctx
        .ctr()
        .tasks()?
        .into_iter()
        .filter(|t| t.id.starts_with(&format!("{}-", ctx.id())))
        .map(|t| json!({ "id": t.id, "status": t.status, "pid > 0": t.pid > 0 }))
        .collect();
    rows.sort_by_key(|r| r["id"].as_str().unwrap_or("").to_string());
    o.put("tasks", json!(rows));
    let quiet = ctx.ctr().run(&["tasks", "ls", "-q"])?;
    let mut q: Vec<String> = quiet
        .stdout_str()
        .lines()
        .filter(|l| l.starts_with(&format!("{}-", ctx.id())))
        .map(str::to_string)
        .collect();
    q.sort();
    o.put("tasks -q", json!(q));
    ctx.ctr().ok(&["tasks", "resume", &paused])?;
    Ok(o)
}

/// An exec id that is in use cannot be taken again; the first exec is unharmed.
fn exec_id_taken(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    ctx.run_detached(ctx.id(), &[], &["sleep", "1000"])?;
    ctx.wait_status(ctx.id(), "RUNNING")?;
    let c = ctx.ctr();
    o.output(
        "first",
        &c.run(&[
            "tasks",
            "exec",
            "-d",
            "--exec-id",
            "dup",
            ctx.id(),
            "sleep",
            "1000",
        ])?,
    );
    let out = c.run(&[
        "tasks",
        "exec",
        "--exec-id",
        "dup",
        ctx.id(),
        "echo",
        "second",
    ])?;
    o.put("second", failure_facts(&out, &["dup"]));
    let ps = c.run(&["tasks", "ps", ctx.id()])?;
    o.put("processes", json!(ps.stdout_str().lines().skip(1).count()));
    Ok(o)
}

/// Signals to processes that have exited: the init of a stopped task, an exec that is gone.
fn signal_exited_process(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let c = ctx.ctr();
    let live = ctx.extra_id("live");
    ctx.run_detached(&live, &[], &["sleep", "1000"])?;
    ctx.run_detached(ctx.id(), &[], &["true"])?;
    ctx.wait_status(ctx.id(), "STOPPED")?;
    let out = c.run(&["tasks", "kill", "--signal", "SIGTERM", ctx.id()])?;
    o.put("kill stopped init", failure_facts(&out, &[]));
    ctx.wait_status(&live, "RUNNING")?;
    o.output(
        "exec",
        &c.run(&["tasks", "exec", "--exec-id", "gone", &live, "true"])?,
    );
    let out = c.run(&[
        "tasks",
        "kill",
        "--exec-id",
        "gone",
        "--signal",
        "SIGTERM",
        &live,
    ])?;
    o.put("kill finished exec", failure_facts(&out, &["gone"]));
    o.put("live status", json!(c.task_status(&live)?));
    Ok(o)
}

/// Starting a task that is already running.
fn start_twice(ctx: &RunCtx) -> Result<Observation> {
    let mut o = Observation::new();
    let c = ctx.ctr();
    o.output(
        "create",
        &c.run(&[
            "containers",
            "create",
            "--runtime",
            ctx.runtime_type(),
            ctx.image(),
            ctx.id(),
            "sleep",
            "1000",
        ])?,
    );
    o.output("start -d", &c.run(&["tasks", "start", "-d", ctx.id()])?);
    ctx.wait_status(ctx.id(), "RUNNING")?;
    let out = c.run(&["tasks", "start", "-d", ctx.id()])?;
    o.put("start again", failure_facts(&out, &[ctx.id()]));
    o.put("status", json!(c.task_status(ctx.id())?));
    Ok(o)
}
