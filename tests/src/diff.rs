//! Observations as structured data, their normalization, and readable differences.

use serde_json::{Map, Value};

use crate::process::Output;

/// What a user saw in one run of a scenario: named values, in the order they were taken.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    fields: Vec<(String, Value)>,
}

impl Observation {
    pub fn new() -> Observation {
        Observation::default()
    }

    /// Records `value` under `key` (a repeated key gets a `#2`, `#3`, ... suffix).
    pub fn put(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        let mut k = key.to_string();
        let mut n = 1;
        while self.fields.iter().any(|(f, _)| *f == k) {
            n += 1;
            k = format!("{key}#{n}");
        }
        self.fields.push((k, value.into()));
        self
    }

    /// Records a command's exit code, stdout and stderr as text.
    pub fn output(&mut self, key: &str, out: &Output) -> &mut Self {
        self.put(key, output_value(out))
    }

    /// Records exit code and stdout only (stderr is checked elsewhere or is noise).
    pub fn output_stdout(&mut self, key: &str, out: &Output) -> &mut Self {
        self.put(
            key,
            serde_json::json!({ "code": out.code, "stdout": out.stdout_str() }),
        )
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        for (k, v) in &self.fields {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }

    pub fn keys(&self) -> Vec<&str> {
        self.fields.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// Applies `norm` to every string (values and keys).
    pub fn normalized(&self, norm: &Normalizer) -> Observation {
        Observation {
            fields: self
                .fields
                .iter()
                .map(|(k, v)| (norm.apply(k), norm.apply_value(v)))
                .collect(),
        }
    }

    /// A readable rendering (for failure messages).
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.fields {
            s.push_str(&format!("  {k}: {}\n", render_value(v)));
        }
        s
    }
}

/// `{code, stdout, stderr}` of a command.
pub fn output_value(out: &Output) -> Value {
    serde_json::json!({
        "code": out.code,
        "signal": out.signal,
        "stdout": out.stdout_str(),
        "stderr": out.stderr_str(),
    })
}

fn render_value(v: &Value) -> String {
    match v {
        Value::String(s) if s.contains('\n') => format!("{s:?}"),
        _ => v.to_string(),
    }
}

/// Replaces what legitimately differs between two runs (container ids, namespaces, runtime
/// names, scratch paths) by placeholders.
#[derive(Clone, Debug, Default)]
pub struct Normalizer {
    pairs: Vec<(String, String)>,
}

impl Normalizer {
    pub fn new() -> Normalizer {
        Normalizer::default()
    }

    /// Replaces every occurrence of `from` by `to`. Longer patterns are applied first.
    pub fn replace(mut self, from: &str, to: &str) -> Self {
        if !from.is_empty() {
            self.pairs.push((from.to_string(), to.to_string()));
            self.pairs.sort_by_key(|(f, _)| std::cmp::Reverse(f.len()));
        }
        self
    }

    pub fn apply(&self, s: &str) -> String {
        let mut out = s.to_string();
        for (f, t) in &self.pairs {
            if out.contains(f.as_str()) {
                out = out.replace(f.as_str(), t);
            }
        }
        mask_log_times(&out)
    }

    pub fn apply_value(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(self.apply(s)),
            Value::Array(a) => Value::Array(a.iter().map(|x| self.apply_value(x)).collect()),
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, x)| (self.apply(k), self.apply_value(x)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// Replaces the value of logrus `time="..."` fields (ctr's warnings) by `<TIME>`.
pub fn mask_log_times(s: &str) -> String {
    const KEY: &str = "time=\"";
    if !s.contains(KEY) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(KEY) {
        out.push_str(&rest[..i + KEY.len()]);
        rest = &rest[i + KEY.len()..];
        match rest.find('"') {
            Some(j) if rest[..j].starts_with(|c: char| c.is_ascii_digit()) => {
                out.push_str("<TIME>");
                rest = &rest[j..];
            }
            _ => {}
        }
    }
    out.push_str(rest);
    out
}

/// Differences between `a` and `b` as `path: a=... b=...` lines (empty when equal).
pub fn differences(a: &Value, b: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk("", a, b, &mut out);
    out
}

fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    if a == b {
        return;
    }
    match (a, b) {
        (Value::Object(ma), Value::Object(mb)) => {
            let mut keys: Vec<&String> = ma.keys().chain(mb.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (ma.get(k), mb.get(k)) {
                    (Some(x), Some(y)) => walk(&p, x, y, out),
                    (Some(x), None) => {
                        out.push(format!("{p}: only in the first: {}", render_value(x)))
                    }
                    (None, Some(y)) => {
                        out.push(format!("{p}: only in the second: {}", render_value(y)))
                    }
                    (None, None) => {}
                }
            }
        }
        (Value::Array(xa), Value::Array(xb)) if xa.len() == xb.len() => {
            for (i, (x, y)) in xa.iter().zip(xb).enumerate() {
                walk(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (Value::String(sa), Value::String(sb)) if sa.contains('\n') || sb.contains('\n') => {
            out.push(format!("{path}: text differs:\n{}", line_diff(sa, sb)));
        }
        _ => out.push(format!(
            "{path}:\n      first:  {}\n      second: {}",
            render_value(a),
            render_value(b)
        )),
    }
}

/// A small line diff (`-` first only, `+` second only, ` ` both), from the longest common
/// subsequence; long inputs fall back to showing both.
pub fn line_diff(a: &str, b: &str) -> String {
    let la: Vec<&str> = a.lines().collect();
    let lb: Vec<&str> = b.lines().collect();
    if la.len() * lb.len() > 4_000_000 {
        return format!("      first:  {a:?}\n      second: {b:?}");
    }
    let (n, m) = (la.len(), lb.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if la[i] == lb[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    let mut push = |c: char, l: &str| out.push_str(&format!("      {c} {l:?}\n"));
    while i < n || j < m {
        if i < n && j < m && la[i] == lb[j] {
            push(' ', la[i]);
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            push('+', lb[j]);
            j += 1;
        } else {
            push('-', la[i]);
            i += 1;
        }
    }
    if a.ends_with('\n') != b.ends_with('\n') {
        out.push_str("      (trailing newline differs)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn normalizer_prefers_longer_patterns() {
        let n = Normalizer::new().replace("ab", "<X>").replace("abc", "<Y>");
        assert_eq!(n.apply("abc ab"), "<Y> <X>");
    }

    #[test]
    fn log_times_are_masked() {
        assert_eq!(
            mask_log_times("time=\"2026-11-21T08:01:26Z\" level=warning msg=\"x\"\n"),
            "time=\"<TIME>\" level=warning msg=\"x\"\n"
        );
        assert_eq!(mask_log_times("no time here"), "no time here");
    }

    #[test]
    fn differences_name_paths() {
        let a = json!({"x": {"code": 0, "out": "a\nb\n"}, "y": [1, 2]});
        let b = json!({"x": {"code": 1, "out": "a\nc\n"}, "y": [1, 2]});
        let d = differences(&a, &b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("x.code"));
        assert!(
            d[1].contains("- \"b\"") && d[1].contains("+ \"c\""),
            "{}",
            d[1]
        );
        assert!(differences(&a, &a).is_empty());
    }
}
