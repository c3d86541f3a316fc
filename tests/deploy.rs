//! Every file in `deploy/` passes its own validator — `systemd-analyze
//! verify` and `security`, `kubernetes-validate`, `promtool check rules`
//! and `promtool test rules` — and each validator is shown to refuse a
//! broken copy, so a pass means something. The Grafana dashboard and the
//! alert rules query only metrics cutover exports. The validators are
//! installed by `.ci/run`; a missing one fails the test naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_cutover");

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap()
}

/// `name` on PATH, or a failure saying how to get it.
fn tool(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: {package} (.ci/run installs it)"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cutover-deploy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let analyze = tool("systemd-analyze", "apt-get install systemd");
    let dir = scratch("systemd");
    // verify checks that ExecStart's binary exists: point it at ours.
    let unit = read("systemd/cutover.service").replace("/usr/local/bin/cutover", BIN);
    let path = dir.join("cutover.service");
    std::fs::write(&path, &unit).unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output(&out));
    assert!(
        !output(&out).contains("cutover.service"),
        "{}",
        output(&out)
    );

    let out = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = output(&out);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for cutover.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(exposure <= 2.0, "exposure {exposure}: {text}");
    for directive in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=cutover",
        "CUTOVER_CUTOVER__STATE_FILE=/var/lib/cutover/",
    ] {
        assert!(unit.contains(directive), "{directive}");
    }

    let broken = dir.join("broken.service");
    std::fs::write(
        &broken,
        unit.replace("ProtectSystem=strict", "ProtectSystem=sometimes"),
    )
    .unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&broken)
        .output()
        .unwrap();
    assert!(
        output(&out).contains("Failed to parse protect system value"),
        "{}",
        output(&out)
    );
}

#[test]
fn the_kubernetes_manifests_validate() {
    let validate = tool("kubernetes-validate", "pip install kubernetes-validate");
    let files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    let kinds: String = files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for kind in [
        "kind: Deployment",
        "kind: Service",
        "kind: ConfigMap",
        "kind: PodDisruptionBudget",
        "kind: PersistentVolumeClaim",
        "secretRef:",
    ] {
        assert!(kinds.contains(kind), "{kind}");
    }
    let out = Command::new(&validate)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(
        output(&out).matches(" passed ").count(),
        files.len(),
        "{}",
        output(&out)
    );

    let deployment = read("kubernetes/deployment.yaml");
    assert!(deployment.contains("path: /readyz") && deployment.contains("path: /healthz"));
    // The configuration in the ConfigMap is one cutover accepts.
    let configmap = read("kubernetes/configmap.yaml");
    let toml: String = configmap
        .split("cutover.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let config = cutover_config::Config::from_toml(
        &toml.replace("password_env = \"APP_DB_PASSWORD\"", "password = \"x\""),
    )
    .unwrap();
    assert_eq!(config.admin.listen.port(), 9187);

    let dir = scratch("kubernetes");
    let broken = dir.join("deployment.yaml");
    std::fs::write(&broken, deployment.replace("  replicas: 1", "  replica: 1")).unwrap();
    let out = Command::new(&validate)
        .arg("--strict")
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output(&out));
    assert!(output(&out).contains("replica"), "{}", output(&out));
}

#[test]
fn the_alert_rules_check_and_pass_their_unit_tests() {
    let promtool = tool("promtool", "apt-get install prometheus");
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(deploy("prometheus/cutover-alerts.yml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output(&out));
    assert!(
        output(&out).contains("SUCCESS: 13 rules found"),
        "{}",
        output(&out)
    );
    let out = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(deploy("prometheus/cutover-alerts.test.yml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output(&out));

    // A rule whose expected alert is wrong fails its test.
    let dir = scratch("prometheus");
    std::fs::copy(
        deploy("prometheus/cutover-alerts.yml"),
        dir.join("cutover-alerts.yml"),
    )
    .unwrap();
    let tests = read("prometheus/cutover-alerts.test.yml").replace(
        "summary: \"verify found 2 rows",
        "summary: \"verify found 3 rows",
    );
    std::fs::write(dir.join("cutover-alerts.test.yml"), tests).unwrap();
    let out = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(dir.join("cutover-alerts.test.yml"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output(&out));
}

/// The `cutover_*` metric names a text mentions, without a histogram's
/// `_bucket`, `_sum` and `_count` suffixes.
fn mentioned(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("cutover_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.push(name);
    }
    out
}

#[test]
fn the_dashboard_and_the_alerts_query_metrics_cutover_exports() {
    let metrics = cutover_control::Metrics::new();
    let exported = metrics.names();
    let known = |name: &str| {
        exported.iter().any(|e| e == name)
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                name.strip_suffix(s)
                    .is_some_and(|base| exported.iter().any(|e| e == base))
            })
    };
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/cutover-dashboard.json")).unwrap();
    let mut expressions = Vec::new();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        titles.push(panel["title"].as_str().unwrap().to_string());
        for target in panel["targets"].as_array().unwrap() {
            expressions.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    let rules = read("prometheus/cutover-alerts.yml");
    let rule_expressions: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: "))
        .collect();
    assert_eq!(rule_expressions.len(), 13);
    let mut used = 0;
    for expr in expressions
        .iter()
        .map(String::as_str)
        .chain(rule_expressions)
    {
        let names = mentioned(expr);
        assert!(!names.is_empty(), "{expr} queries no cutover metric");
        for name in names {
            assert!(
                known(&name),
                "{name} (in {expr}) is not a metric cutover exports"
            );
            used += 1;
        }
    }
    assert!(used > 30);
    for needed in [
        "Phase",
        "Read dial",
        "Replication lag",
        "Commit wait",
        "Reads by backend",
        "Read fallbacks by reason",
        "Write pauses",
        "Ramp",
        "Shadow reads",
    ] {
        assert!(titles.iter().any(|t| t == needed), "no {needed} panel");
    }
}

#[test]
fn the_containerfile_is_multi_stage_and_runs_only_the_binary_as_non_root() {
    let file = read("Containerfile");
    let instructions: Vec<&str> = file
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "multi-stage");
    let last = &instructions[*stages.last().unwrap()..];
    assert!(
        !last.iter().any(|l| l.starts_with("RUN ")),
        "the final stage runs nothing at build time"
    );
    let copies: Vec<&&str> = last.iter().filter(|l| l.starts_with("COPY ")).collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    assert!(copies.iter().any(|c| c.ends_with("/usr/local/bin/cutover")));
    assert!(copies.iter().any(|c| c.contains("ca-certificates.crt")));
    let user = last
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER in the final stage");
    assert_ne!(user.split(':').next(), Some("0"));
    assert_ne!(user, "root");
    assert!(file.contains("cargo build --release --locked --bin cutover"));
}
