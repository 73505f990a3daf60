//! Netfilter rules of our own in a container's network namespace, as iptables-restore
//! transactions.
//!
//! Each mechanism owns a few chains named `RA-HIB-<PURPOSE>-<TAG>` ([`chain_name`]; the
//! tag comes from the container's id, so containers sharing a pod's namespace never touch
//! each other's chains) plus jumps into them from built-in chains. A [`RuleSet`] says
//! what one mechanism wants in one family; [`install`] makes the namespace hold exactly
//! that, and [`remove`] / [`remove_all`] take chains out by name:
//!
//! - Every change is one `iptables-restore --noflush` transaction per family (IPv4, then
//!   IPv6), so a packet sees either the old rules or the new ones, never half of them. If
//!   the IPv6 transaction fails after the IPv4 one applied, the IPv4 one is undone.
//! - Changes are idempotent: the current rules are read first (`iptables-save`), jumps
//!   into our chains that are already there are deleted in the same transaction that
//!   inserts the new ones, and a chain that exists is flushed by its declaration. A
//!   mechanism started twice, or after a crash, ends with one copy of its rules.
//! - After a crash nothing needs remembering: [`remove_all`] finds every chain whose name
//!   starts with [`PREFIX`] in the namespace's rules (`shim delete`).
//!
//! Programs run in the namespace through [`run_in`]: it enters the namespace between fork
//! and exec and waits through the shim's reaper (the checkpoint's network lock uses it
//! too).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{NetError, NetNs};
use crate::exits::ExitWatcher;

/// Every chain of hibernation's starts with this.
pub const PREFIX: &str = "RA-HIB-";

/// How long one iptables program may take.
pub const PROGRAM_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a transaction is tried when the rules changed under it.
const ATTEMPTS: usize = 3;

/// An address family of the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The transaction program.
    pub fn restore_program(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The program that prints the rules.
    pub fn save_program(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    /// The single-rule program.
    pub fn single_program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// The family of an address.
    pub fn of(ip: &std::net::IpAddr) -> Family {
        match ip.to_canonical() {
            std::net::IpAddr::V4(_) => Family::V4,
            std::net::IpAddr::V6(_) => Family::V6,
        }
    }
}

/// The families this host has: IPv4, and IPv6 unless the kernel has none.
pub fn families() -> &'static [Family] {
    if std::path::Path::new("/proc/sys/net/ipv6").exists() {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    }
}

/// The tag of a container's chains: 8 hex digits of a hash of its id (FNV-1a, stable
/// across versions and hosts: a later shim finds an earlier one's chains).
pub fn tag_of(id: &str) -> String {
    format!("{:08x}", fnv1a(id.as_bytes()))
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// `RA-HIB-<PURPOSE>-<TAG>` (iptables allows 28 characters: purposes are short).
pub fn chain_name(purpose: &str, tag: &str) -> String {
    format!("{PREFIX}{purpose}-{tag}")
}

/// A netfilter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Filter,
    Nat,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }
}

/// What one mechanism wants in one family: chains of its own with their rules, and jumps
/// into them from built-in chains (inserted at the top, in the order given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    chains: Vec<(Table, String, Vec<String>)>,
    jumps: Vec<(Table, String, String)>,
}

impl RuleSet {
    pub fn new() -> RuleSet {
        RuleSet::default()
    }

    /// Declares chain `name` in `table` with `rules` (each the part after `-A NAME`).
    pub fn chain(&mut self, table: Table, name: &str, rules: Vec<String>) -> &mut Self {
        self.chains.push((table, name.to_string(), rules));
        self
    }

    /// A jump from built-in chain `from` in `table`: `spec` is the whole rule after
    /// `-I FROM N` (matches and `-j CHAIN`).
    pub fn jump(&mut self, table: Table, from: &str, spec: String) -> &mut Self {
        self.jumps.push((table, from.to_string(), spec));
        self
    }

    /// The chains this set declares.
    pub fn chain_names(&self) -> impl Iterator<Item = &str> {
        self.chains.iter().map(|(_, n, _)| n.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }

    /// The transaction that makes the rules of `saved` hold exactly this set.
    pub fn install_text(&self, saved: &Saved) -> String {
        let owns = |name: &str| self.chain_names().any(|n| n == name);
        let mut tables: BTreeMap<Table, String> = BTreeMap::new();
        for (table, name, _) in &self.chains {
            let text = tables.entry(*table).or_default();
            text.push_str(&format!(":{name} - [0:0]\n"));
        }
        for (table, _, _) in &self.jumps {
            tables.entry(*table).or_default();
        }
        for (table, text) in tables.iter_mut() {
            if let Some(t) = saved.table(table.name()) {
                for (chain, spec) in &t.rules {
                    if !owns(chain) && target_of(spec).is_some_and(owns) {
                        text.push_str(&format!("-D {chain} {spec}\n"));
                    }
                }
            }
        }
        for (table, name, rules) in &self.chains {
            let text = tables.entry(*table).or_default();
            for r in rules {
                text.push_str(&format!("-A {name} {r}\n"));
            }
        }
        let mut position: BTreeMap<(Table, &str), usize> = BTreeMap::new();
        for (table, from, spec) in &self.jumps {
            let n = position.entry((*table, from.as_str())).or_insert(0);
            *n += 1;
            let text = tables.entry(*table).or_default();
            text.push_str(&format!("-I {from} {n} {spec}\n"));
        }
        wrap(tables)
    }
}

/// The transaction that removes every chain `owns` says is ours from the rules of
/// `saved`, with every jump into them. `None` when there is nothing to remove.
pub fn removal_text(saved: &Saved, owns: impl Fn(&str) -> bool) -> Option<String> {
    let mut tables: BTreeMap<&str, String> = BTreeMap::new();
    for t in &saved.tables {
        let ours: Vec<&String> = t.chains.iter().filter(|c| owns(c)).collect();
        let jumps: Vec<&(String, String)> = t
            .rules
            .iter()
            .filter(|(chain, spec)| !owns(chain) && target_of(spec).is_some_and(&owns))
            .collect();
        if ours.is_empty() && jumps.is_empty() {
            continue;
        }
        let mut text = String::new();
        for (chain, spec) in jumps {
            text.push_str(&format!("-D {chain} {spec}\n"));
        }
        for c in &ours {
            text.push_str(&format!("-F {c}\n"));
        }
        for c in &ours {
            text.push_str(&format!("-X {c}\n"));
        }
        tables.insert(t.name.as_str(), text);
    }
    if tables.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (name, text) in tables {
        out.push_str(&format!("*{name}\n{text}COMMIT\n"));
    }
    Some(out)
}

fn wrap(tables: BTreeMap<Table, String>) -> String {
    let mut out = String::new();
    for (table, text) in tables {
        out.push_str(&format!("*{}\n{text}COMMIT\n", table.name()));
    }
    out
}

/// The rules of one family as `iptables-save` prints them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    pub tables: Vec<SavedTable>,
}

/// One table of [`Saved`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    /// User-defined chains (built-in ones have a policy).
    pub chains: Vec<String>,
    /// Every rule: its chain and the rest of its `-A CHAIN ...` line.
    pub rules: Vec<(String, String)>,
}

impl Saved {
    /// Parses `iptables-save` output.
    pub fn parse(text: &str) -> Saved {
        let mut out = Saved::default();
        for line in text.lines() {
            let line = line.trim_end();
            if let Some(name) = line.strip_prefix('*') {
                out.tables.push(SavedTable {
                    name: name.trim().to_string(),
                    ..Default::default()
                });
                continue;
            }
            let Some(t) = out.tables.last_mut() else {
                continue;
            };
            if let Some(decl) = line.strip_prefix(':') {
                let mut f = decl.split_whitespace();
                if let (Some(name), Some(policy)) = (f.next(), f.next()) {
                    if policy == "-" {
                        t.chains.push(name.to_string());
                    }
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                if let Some((chain, spec)) = rule.split_once(' ') {
                    t.rules.push((chain.to_string(), spec.to_string()));
                }
            }
        }
        out
    }

    pub fn table(&self, name: &str) -> Option<&SavedTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Every user-defined chain, in every table.
    pub fn chain_names(&self) -> impl Iterator<Item = &str> {
        self.tables
            .iter()
            .flat_map(|t| t.chains.iter().map(String::as_str))
    }
}

/// `iptables-save` text without the chains `owns` says are ours and without the rules
/// that jump into them (a checkpoint's image of the namespace's own rules).
pub fn strip_saved(text: &str, owns: impl Fn(&str) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let l = line.trim_end();
        let drop = if let Some(decl) = l.strip_prefix(':') {
            decl.split_whitespace().next().is_some_and(&owns)
        } else if let Some(rule) = l.strip_prefix("-A ") {
            match rule.split_once(' ') {
                Some((chain, spec)) => owns(chain) || target_of(spec).is_some_and(&owns),
                None => owns(rule),
            }
        } else {
            false
        };
        if !drop {
            out.push_str(line);
        }
    }
    out
}

/// The chain a rule jumps or goes to (`-j NAME` / `-g NAME`), if any.
pub fn target_of(spec: &str) -> Option<&str> {
    let tokens = tokens(spec);
    tokens
        .iter()
        .position(|t| matches!(*t, "-j" | "-g" | "--jump" | "--goto"))
        .and_then(|i| tokens.get(i + 1).copied())
}

/// The words of a rule, a double-quoted string (with `\"` inside) counting as one.
fn tokens(spec: &str) -> Vec<&str> {
    let bytes = spec.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let start = i;
        let mut quoted = false;
        while i < bytes.len() && (quoted || !bytes[i].is_ascii_whitespace()) {
            match bytes[i] {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                _ => {}
            }
            i += 1;
        }
        out.push(&spec[start..i.min(bytes.len())]);
    }
    out
}

/// Makes the namespace's rules hold exactly `sets` (per family; an empty set changes
/// nothing in its family). On failure no family keeps a part of it.
pub async fn install(ns: &NetNs, sets: &[(Family, RuleSet)]) -> Result<(), NetError> {
    let _guard = ns.lock_rules().await;
    let mut done: Vec<&(Family, RuleSet)> = Vec::new();
    for entry in sets {
        let (family, set) = entry;
        if set.is_empty() {
            continue;
        }
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            let saved = Saved::parse(&save_locked(ns, *family).await?);
            let text = set.install_text(&saved);
            match restore(ns, *family, &text).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    debug!(attempt, "install rules: {e}");
                    last = Some(e);
                }
            }
        }
        if let Some(e) = last {
            // Leave nothing half-installed behind.
            for (family, set) in done {
                let names: Vec<&str> = set.chain_names().collect();
                if let Err(undo) = remove_locked(ns, *family, &|c| names.contains(&c)).await {
                    warn!("undo rules after a failed install: {undo}");
                }
            }
            return Err(e);
        }
        done.push(entry);
    }
    Ok(())
}

/// Removes the chains named `names` (every family, every table) with every jump into
/// them. Returns how many chains were removed.
pub async fn remove(ns: &NetNs, names: &[String]) -> Result<usize, NetError> {
    let _guard = ns.lock_rules().await;
    let mut n = 0;
    for family in families() {
        n += remove_locked(ns, *family, &|c| names.iter().any(|x| x == c)).await?;
    }
    Ok(n)
}

/// Removes every chain of hibernation's ([`PREFIX`]) from the namespace, whoever made
/// it: after a crash, for `shim delete`. Returns how many chains were removed.
pub async fn remove_all(ns: &NetNs) -> Result<usize, NetError> {
    remove_matching(ns, |c| c.starts_with(PREFIX)).await
}

/// Removes every chain whose name `owns` accepts.
pub async fn remove_matching(
    ns: &NetNs,
    owns: impl Fn(&str) -> bool + Sync,
) -> Result<usize, NetError> {
    let _guard = ns.lock_rules().await;
    let mut n = 0;
    for family in families() {
        n += remove_locked(ns, *family, &owns).await?;
    }
    Ok(n)
}

async fn remove_locked(
    ns: &NetNs,
    family: Family,
    owns: &(dyn Fn(&str) -> bool + Sync),
) -> Result<usize, NetError> {
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        let saved = Saved::parse(&save_locked(ns, family).await?);
        let n = saved.chain_names().filter(|c| owns(c)).count();
        let Some(text) = removal_text(&saved, owns) else {
            return Ok(0);
        };
        match restore(ns, family, &text).await {
            Ok(()) => {
                if n > 0 {
                    info!(
                        chains = n,
                        program = family.restore_program(),
                        "rules removed"
                    );
                }
                return Ok(n);
            }
            Err(e) => {
                debug!(attempt, "remove rules: {e}");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(NetError::Program {
        program: family.restore_program().into(),
        ino: ns.ino(),
        detail: "failed".into(),
    }))
}

/// The namespace's rules of `family` as `iptables-save` prints them.
pub async fn save(ns: &NetNs, family: Family) -> Result<String, NetError> {
    let _guard = ns.lock_rules().await;
    save_locked(ns, family).await
}

async fn save_locked(ns: &NetNs, family: Family) -> Result<String, NetError> {
    let program = family.save_program();
    let out = run_in(ns.exits(), ns.fd(), Command::new(program), None, true)
        .await
        .map_err(|detail| NetError::Program {
            program: program.into(),
            ino: ns.ino(),
            detail,
        })?;
    if out.code != 0 {
        return Err(NetError::Program {
            program: program.into(),
            ino: ns.ino(),
            detail: format!("exit status {}: {}", out.code, out.stderr.trim()),
        });
    }
    Ok(out.stdout)
}

/// Applies `text` as one `iptables-restore --noflush` transaction.
async fn restore(ns: &NetNs, family: Family, text: &str) -> Result<(), NetError> {
    let program = family.restore_program();
    let mut cmd = Command::new(program);
    cmd.args(["-w", "--noflush"]);
    let out = run_in(ns.exits(), ns.fd(), cmd, Some(text), false)
        .await
        .map_err(|detail| NetError::Program {
            program: program.into(),
            ino: ns.ino(),
            detail,
        })?;
    if out.code != 0 {
        return Err(NetError::Program {
            program: program.into(),
            ino: ns.ino(),
            detail: format!(
                "exit status {}: {} (transaction:\n{text})",
                out.code,
                out.stderr.trim()
            ),
        });
    }
    Ok(())
}

/// What a program run by [`run_in`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgramOutput {
    pub code: i32,
    /// Its standard output (when asked for).
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` in the network namespace `netns`, feeding it `input`; waits for it through
/// the shim's reaper and returns its exit code and output (stdout only when `capture`),
/// or why it could not run or finish.
pub async fn run_in(
    exits: &ExitWatcher,
    netns: BorrowedFd<'_>,
    mut cmd: Command,
    input: Option<&str>,
    capture: bool,
) -> Result<ProgramOutput, String> {
    let fd = netns.as_raw_fd();
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(if capture {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stderr(Stdio::piped());
    // SAFETY: the hook runs between fork and exec and only calls setns(2), which is
    // async-signal-safe; `fd` stays open in the parent (borrowed for this call) until the
    // child has exec'd.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().map_err(|e| {
        warn!(program, "cannot run: {e}");
        format!("cannot run: {e}")
    })?;
    let pid = i32::try_from(child.id()).map_err(|e| e.to_string())?;
    let exited = exits.register(pid);
    // Pipes are read and written on blocking threads: a program that fills its output
    // pipe must not stall on us while we feed its input.
    let feed = match (input, child.stdin.take()) {
        (Some(text), Some(mut stdin)) => {
            let text = text.to_string();
            let program = program.clone();
            Some(tokio::task::spawn_blocking(move || {
                if let Err(e) = stdin.write_all(text.as_bytes()) {
                    debug!(program, "write input: {e}");
                }
            }))
        }
        _ => None,
    };
    let stdout = child.stdout.take().map(|mut out| {
        tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        })
    });
    let stderr = child.stderr.take().map(|err| {
        tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            let _ = err.take(64 * 1024).read_to_string(&mut s);
            s
        })
    });
    // The reaper owns the exit; the handle neither waits nor kills on drop.
    drop(child);
    let code = match tokio::time::timeout(PROGRAM_TIMEOUT, exited).await {
        Ok(Ok(code)) => {
            debug!(program, code, "program done");
            code
        }
        Ok(Err(_)) => return Err("its exit was lost".into()),
        Err(_) => {
            warn!(program, "did not finish in time");
            return Err(format!("did not finish within {PROGRAM_TIMEOUT:?}"));
        }
    };
    if let Some(f) = feed {
        let _ = f.await;
    }
    let stdout = match stdout {
        Some(t) => t.await.unwrap_or_default(),
        None => String::new(),
    };
    let stderr = match stderr {
        Some(t) => t.await.unwrap_or_default(),
        None => String::new(),
    };
    Ok(ProgramOutput {
        code,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:RA-HIB-ACT-0000abcd - [0:0]
:RA-HIB-TOUCH-0000abcd - [0:0]
:USER - [0:0]
-A INPUT ! -i lo -p tcp -j RA-HIB-ACT-0000abcd
-A INPUT -p tcp -m tcp --dport 22 -j USER
-A INPUT ! -i lo -p tcp -j RA-HIB-ACT-0000abcd
-A RA-HIB-ACT-0000abcd -p tcp -m string --string \"-j RA-HIB-X\" --algo bm --to 1200 -g RA-HIB-TOUCH-0000abcd
-A RA-HIB-TOUCH-0000abcd -j NFLOG --nflog-group 7
-A USER -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:RA-HIB-SHADOW-0000abcd - [0:0]
-A PREROUTING -j RA-HIB-SHADOW-0000abcd
-A RA-HIB-SHADOW-0000abcd -p tcp -m tcp --dport 19090 -j REDIRECT --to-ports 8080
COMMIT
";

    #[test]
    fn parse_save_output() {
        let s = Saved::parse(SAVED);
        assert_eq!(s.tables.len(), 2);
        let f = s.table("filter").unwrap();
        assert_eq!(
            f.chains,
            vec!["RA-HIB-ACT-0000abcd", "RA-HIB-TOUCH-0000abcd", "USER"]
        );
        assert_eq!(f.rules.len(), 6);
        assert_eq!(target_of(&f.rules[3].1), Some("RA-HIB-TOUCH-0000abcd"));
        assert_eq!(target_of("-p tcp -j ACCEPT"), Some("ACCEPT"));
        assert_eq!(target_of("-p tcp"), None);
    }

    #[test]
    fn quoted_strings_are_one_token() {
        let t = tokens(r#"-m string --string "a \" -j X" --algo bm -j Y"#);
        assert_eq!(
            t,
            vec![
                "-m",
                "string",
                "--string",
                r#""a \" -j X""#,
                "--algo",
                "bm",
                "-j",
                "Y"
            ]
        );
        assert_eq!(
            target_of(r#"-m string --string "a \" -j X" --algo bm -j Y"#),
            Some("Y")
        );
    }

    #[test]
    fn removal_takes_every_jump_and_chain() {
        let s = Saved::parse(SAVED);
        let text = removal_text(&s, |c| c.starts_with(PREFIX)).unwrap();
        assert_eq!(
            text,
            "*filter\n\
             -D INPUT ! -i lo -p tcp -j RA-HIB-ACT-0000abcd\n\
             -D INPUT ! -i lo -p tcp -j RA-HIB-ACT-0000abcd\n\
             -F RA-HIB-ACT-0000abcd\n-F RA-HIB-TOUCH-0000abcd\n\
             -X RA-HIB-ACT-0000abcd\n-X RA-HIB-TOUCH-0000abcd\nCOMMIT\n\
             *nat\n-D PREROUTING -j RA-HIB-SHADOW-0000abcd\n\
             -F RA-HIB-SHADOW-0000abcd\n-X RA-HIB-SHADOW-0000abcd\nCOMMIT\n"
        );
        assert!(removal_text(&s, |c| c == "NOPE").is_none());
    }

    #[test]
    fn install_replaces_old_jumps() {
        let s = Saved::parse(SAVED);
        let mut set = RuleSet::new();
        set.chain(
            Table::Filter,
            "RA-HIB-ACT-0000abcd",
            vec!["-p tcp --syn -j NFLOG --nflog-group 9".into()],
        )
        .jump(
            Table::Filter,
            "INPUT",
            "! -i lo -p tcp -j RA-HIB-ACT-0000abcd".into(),
        )
        .jump(Table::Filter, "OUTPUT", "-j RA-HIB-ACT-0000abcd".into());
        let text = set.install_text(&s);
        assert_eq!(
            text,
            "*filter\n:RA-HIB-ACT-0000abcd - [0:0]\n\
             -D INPUT ! -i lo -p tcp -j RA-HIB-ACT-0000abcd\n\
             -D INPUT ! -i lo -p tcp -j RA-HIB-ACT-0000abcd\n\
             -A RA-HIB-ACT-0000abcd -p tcp --syn -j NFLOG --nflog-group 9\n\
             -I INPUT 1 ! -i lo -p tcp -j RA-HIB-ACT-0000abcd\n\
             -I OUTPUT 1 -j RA-HIB-ACT-0000abcd\nCOMMIT\n"
        );
        // Into an empty namespace: declarations, rules, jumps.
        let text = set.install_text(&Saved::default());
        assert!(text.starts_with("*filter\n:RA-HIB-ACT-0000abcd - [0:0]\n-A "));
    }

    #[test]
    fn strip_keeps_everything_else() {
        let out = strip_saved(SAVED, |c| c.starts_with(PREFIX));
        assert!(!out.contains(PREFIX), "{out}");
        assert!(out.contains(":USER - [0:0]\n"));
        assert!(out.contains("-A INPUT -p tcp -m tcp --dport 22 -j USER\n"));
        assert!(out.contains("-A USER -j ACCEPT\n"));
        assert!(out.contains("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"));
        assert_eq!(out.matches("COMMIT").count(), 2);
    }

    #[test]
    fn names_and_tags() {
        assert_eq!(tag_of("abc"), tag_of("abc"));
        assert_ne!(tag_of("abc"), tag_of("abd"));
        assert_eq!(tag_of("").len(), 8);
        let n = chain_name("SHADOW", &tag_of("x"));
        assert!(n.len() <= 28 && n.starts_with(PREFIX), "{n}");
    }
}
