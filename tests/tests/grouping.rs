//! One shim per pod: containers whose specs carry the same CRI sandbox id annotation are
//! served by one shim process, which exits when the last of them is deleted. Checked for
//! the stock runc shim and for runc-architect in the same run, on containerd 1.7 and 2.1.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use runc_architect_tests::cleanup::serving_shims;
use runc_architect_tests::image::{ImageBuilder, BUSYBOX_IMAGE};
use runc_architect_tests::poll::wait_for;
use runc_architect_tests::{Containerd, Ctr, Runtime, Version};

/// Pids of `binary` processes serving namespace `ns` (their command line names it).
fn shims(binary: &str, ns: &str) -> Vec<u32> {
    serving_shims(binary, |args| {
        args.windows(2).any(|w| w[0] == "-namespace" && w[1] == ns)
    })
}

fn binary_name(rt: Runtime) -> &'static str {
    match rt {
        Runtime::Stock => "containerd-shim-runc-v2",
        Runtime::Architect => "containerd-shim-runc-architect-v1",
    }
}

fn one_pod(ctr: &Ctr, rt: Runtime) -> Result<()> {
    let ns = ctr.namespace().to_string();
    let pod = format!("pod-{}", rt.tag());
    let annotation = format!("io.kubernetes.cri.sandbox-id={pod}");
    let ids: Vec<String> = (0..3).map(|i| format!("{pod}-c{i}")).collect();
    for id in &ids {
        ctr.ok(&[
            "run",
            "-d",
            "--runtime",
            rt.runtime_type(),
            "--annotation",
            &annotation,
            BUSYBOX_IMAGE,
            id,
            "sleep",
            "1000",
        ])
        .with_context(|| format!("run {id}"))?;
    }
    let pids = shims(binary_name(rt), &ns);
    ensure!(
        pids.len() == 1,
        "{}: expected one shim for the pod, found {pids:?}",
        rt.name()
    );
    // Deleting two of three leaves the shim serving the third.
    for id in &ids[..2] {
        ctr.ok(&["task", "kill", "-s", "SIGKILL", id])?;
        ctr.wait_status(id, "STOPPED", Duration::from_secs(10))?;
        ctr.ok(&["task", "rm", id])?;
        ctr.ok(&["container", "rm", id])?;
    }
    ensure!(
        shims(binary_name(rt), &ns) == pids,
        "{}: the pod's shim went away early",
        rt.name()
    );
    let out = ctr.ok(&[
        "task",
        "exec",
        "--exec-id",
        "probe",
        &ids[2],
        "sh",
        "-c",
        "echo alive",
    ])?;
    ensure!(
        out.stdout_str().trim() == "alive",
        "{}: exec after partial delete: {:?}",
        rt.name(),
        out.stdout_str()
    );
    // The last delete ends the shim.
    ctr.ok(&["task", "kill", "-s", "SIGKILL", &ids[2]])?;
    ctr.wait_status(&ids[2], "STOPPED", Duration::from_secs(10))?;
    ctr.ok(&["task", "rm", &ids[2]])?;
    ctr.ok(&["container", "rm", &ids[2]])?;
    wait_for("the pod's shim to exit", Duration::from_secs(10), || {
        shims(binary_name(rt), &ns).is_empty().then_some(())
    })
    .with_context(|| format!("{}: shim still running after the last delete", rt.name()))?;
    Ok(())
}

#[test]
fn containers_of_a_pod_share_one_shim() -> Result<()> {
    let mut failures = Vec::new();
    for version in Version::selected()? {
        let containerd = Containerd::start(version)?;
        let ctr = containerd.ctr(&format!("ra-group-{}", containerd.unique()));
        let dir = containerd.scratch_dir("image")?;
        ImageBuilder::busybox(BUSYBOX_IMAGE)?.import(&ctr, &dir)?;
        for rt in Runtime::ALL {
            if let Err(e) = one_pod(&ctr, rt) {
                failures.push(format!("containerd {}: {e:#}", version.series()));
            }
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}
