//! The Kubernetes manifests in deploy/ (not deploy/bench/, which holds benchmark scripts): every
//! YAML document parses into its k8s-openapi type without losing a field; the DaemonSet, RBAC,
//! node settings and kustomizations say what the agent needs; `kubectl kustomize` renders the
//! install, the canary overlay and the uninstall helper as they are meant; the Dockerfile builds
//! with xtask's commands and pins; and a real API server takes the manifests by server-side
//! apply and gives them back. Needs no root. The render test needs kubectl and the last test the
//! test API server (tests/k8s-apiserver, built on first use): without them they fail under
//! CI=true and print "skipped: ..." otherwise.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The agent's command line in Kubernetes mode, as the DaemonSet must run it.
const AGENT_COMMAND: &[&str] = &[
    "lb-agent",
    "run",
    "--kubernetes",
    "--node-name",
    "$(NODE_NAME)",
    "--config",
    "/etc/xdplb/node.toml",
    "--backend-ifaces",
    "eni*",
    "--xdp-mode",
    "auto",
    "--keep-on-exit",
    "--metrics-addr",
    "127.0.0.1:9435",
    "--scrape-addr",
    "$(HOST_IP):9435",
];
/// The agent's capabilities, as the DaemonSet grants them (tests/tests/capabilities.rs runs the
/// agent with the set it reads from the DaemonSet).
const AGENT_CAPABILITIES: &[&str] = &["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"];
const METRICS_PORT: i32 = 9435;
const NAMESPACE: &str = "xdplb-system";
const IMAGE: &str = "ghcr.io/xdplb/lb-agent:0.1.0";
/// Every annotation the agent reads, as README.md must list them.
const ANNOTATIONS: &[&str] = &[
    "xdplb.io/enabled",
    "xdplb.io/mode",
    "xdplb.io/backend-weights",
    "xdplb.io/deregistration-delay-seconds",
    "xdplb.io/deregistration-reset",
    "xdplb.io/rate-limit",
    "rate-limit.xdplb.io/packets-per-second",
    "rate-limit.xdplb.io/packets-burst",
    "rate-limit.xdplb.io/connections-per-second",
    "rate-limit.xdplb.io/connections-burst",
    "rate-limit.xdplb.io/ipv6-prefix",
    "rate-limit.xdplb.io/table-full",
    "rate-limit.xdplb.io/reject-syn-with-rst",
    "rate-limit.xdplb.io/exempt",
    "rate-limit.xdplb.io/deny",
];

// ---------------------------------------------------------------------------------------------
// Reading deploy/.
// ---------------------------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

/// Every .yaml/.yml file under deploy/, except deploy/bench/, sorted.
fn yaml_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, skip: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path == skip {
                continue;
            }
            if path.is_dir() {
                walk(&path, skip, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let deploy = deploy_dir();
    let mut out = Vec::new();
    walk(&deploy, &deploy.join("bench"), &mut out);
    out.sort();
    out
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n == "kustomization.yaml" || n == "kustomization.yml")
}

fn relative(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The YAML documents of a file, as JSON values (empty documents dropped).
fn documents(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", relative(path)));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// One Kubernetes object from deploy/, typed.
#[derive(Debug, Clone)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    /// Boxed: much larger than the others.
    DaemonSet(Box<DaemonSet>),
}

impl Object {
    fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::ClusterRole(o) => &o.metadata,
            Object::ClusterRoleBinding(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::ConfigMap(_) => "ConfigMap",
            Object::DaemonSet(_) => "DaemonSet",
        }
    }
}

/// Parses `doc` as a `T` and checks that nothing was dropped on the way: k8s-openapi ignores
/// fields it does not know, so a misspelt or misplaced field would otherwise vanish silently.
fn typed<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> T {
    let object: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: does not parse as {}: {e}", type_name::<T>()));
    let back = serde_json::to_value(&object).unwrap();
    if let Some(diff) = first_difference(doc, &back, "") {
        panic!(
            "{file}: a field does not survive parsing as {} (misspelt or misplaced?): {diff}",
            type_name::<T>()
        );
    }
    object
}

fn type_name<T>() -> &'static str {
    std::any::type_name::<T>().rsplit("::").next().unwrap()
}

/// Where `got` differs from `want` (exact comparison), or None.
fn first_difference(want: &Value, got: &Value, path: &str) -> Option<String> {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for key in w.keys().chain(g.keys()).collect::<BTreeSet<_>>() {
                let here = format!("{path}.{key}");
                match (w.get(key), g.get(key)) {
                    (Some(a), Some(b)) => {
                        if let Some(d) = first_difference(a, b, &here) {
                            return Some(d);
                        }
                    }
                    (Some(a), None) => return Some(format!("{here}: {a} is lost")),
                    (None, Some(b)) => return Some(format!("{here}: {b} appears")),
                    (None, None) => unreachable!(),
                }
            }
            None
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => w
            .iter()
            .zip(g)
            .enumerate()
            .find_map(|(i, (a, b))| first_difference(a, b, &format!("{path}[{i}]"))),
        _ if want == got => None,
        _ => Some(format!("{path}: {want} became {got}")),
    }
}

/// Every object of every manifest (kustomizations aside), with the file it came from.
fn objects() -> Vec<(String, Object)> {
    let mut out = Vec::new();
    for path in yaml_files().iter().filter(|p| !is_kustomization(p)) {
        let file = relative(path);
        for doc in documents(path) {
            let api_version = doc["apiVersion"].as_str().unwrap_or_default();
            let kind = doc["kind"].as_str().unwrap_or_default();
            let object = match (api_version, kind) {
                ("v1", "Namespace") => Object::Namespace(typed(&file, &doc)),
                ("v1", "ServiceAccount") => Object::ServiceAccount(typed(&file, &doc)),
                ("v1", "ConfigMap") => Object::ConfigMap(typed(&file, &doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    Object::ClusterRole(typed(&file, &doc))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    Object::ClusterRoleBinding(typed(&file, &doc))
                }
                ("apps/v1", "DaemonSet") => Object::DaemonSet(Box::new(typed(&file, &doc))),
                other => panic!("{file}: unexpected object {other:?}: teach this test about it"),
            };
            out.push((file.clone(), object));
        }
    }
    out.push((
        "deploy/base/node.toml".to_string(),
        Object::ConfigMap(node_config()),
    ));
    out
}

/// The node settings as the ConfigMap base/kustomization.yaml generates from base/node.toml,
/// under the name the DaemonSet refers to (kustomize appends a hash of the content to both).
fn node_config() -> ConfigMap {
    let kustomization = documents(&deploy_dir().join("base/kustomization.yaml"))
        .pop()
        .expect("base/kustomization.yaml");
    let generators = kustomization["configMapGenerator"]
        .as_array()
        .expect("a configMapGenerator");
    assert_eq!(generators.len(), 1);
    let g = &generators[0];
    assert_eq!(g["files"], serde_json::json!(["node.toml"]));
    let text = fs::read_to_string(deploy_dir().join("base/node.toml")).expect("base/node.toml");
    let labels = g["options"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    ConfigMap {
        metadata: ObjectMeta {
            name: g["name"].as_str().map(String::from),
            namespace: g["namespace"].as_str().map(String::from),
            labels: Some(labels),
            ..Default::default()
        },
        data: Some([("node.toml".to_string(), text)].into()),
        ..Default::default()
    }
}

/// The one object of its kind in `file` (relative to deploy/).
fn one<T>(file: &str, pick: impl Fn(&Object) -> Option<&T>) -> T
where
    T: Clone,
{
    let want = format!("deploy/{file}");
    let found: Vec<T> = objects()
        .iter()
        .filter(|(f, _)| *f == want)
        .filter_map(|(_, o)| pick(o).cloned())
        .collect();
    assert_eq!(found.len(), 1, "{want}: expected exactly one such object");
    found.into_iter().next().unwrap()
}

fn agent_daemonset() -> DaemonSet {
    one("base/daemonset.yaml", |o| match o {
        Object::DaemonSet(d) => Some(d.as_ref()),
        _ => None,
    })
}

fn agent_container(ds: &DaemonSet) -> Container {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("a container named agent")
        .clone()
}

/// Bytes of a memory quantity ("192Mi", "1Gi", "500M", "1048576").
fn bytes(quantity: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return n.parse::<u64>().expect("an integer quantity") * factor;
        }
    }
    quantity.parse().expect("a memory quantity")
}

// ---------------------------------------------------------------------------------------------
// Parsing: every file, every object.
// ---------------------------------------------------------------------------------------------

#[test]
fn every_manifest_parses_into_its_kubernetes_type_without_losing_a_field() {
    let objects = objects();
    let kinds: BTreeSet<&str> = objects.iter().map(|(_, o)| o.kind()).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ] {
        assert!(kinds.contains(kind), "no {kind} in deploy/");
    }
}

#[test]
fn namespaced_objects_live_in_the_agents_namespace() {
    let namespace = one("base/namespace.yaml", |o| match o {
        Object::Namespace(n) => Some(n),
        _ => None,
    });
    assert_eq!(namespace.metadata.name.as_deref(), Some(NAMESPACE));
    let labels = namespace.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged"),
        "the agent's pod is beyond baseline: Pod Security admission must allow it here"
    );
    for (file, object) in objects() {
        let cluster_scoped = matches!(
            object,
            Object::Namespace(_) | Object::ClusterRole(_) | Object::ClusterRoleBinding(_)
        );
        let namespace = object.meta().namespace.as_deref();
        if cluster_scoped {
            assert_eq!(
                namespace, None,
                "{file}: a cluster-scoped object with a namespace"
            );
        } else {
            assert_eq!(namespace, Some(NAMESPACE), "{file}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The DaemonSet.
// ---------------------------------------------------------------------------------------------

#[test]
fn daemonset_runs_the_agent_in_kubernetes_mode_on_the_hosts_network() {
    let ds = agent_daemonset();
    let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_eq!(pod.host_network, Some(true));
    let agent = agent_container(&ds);
    assert_eq!(agent.image.as_deref(), Some(IMAGE));
    let command: Vec<String> = agent
        .command
        .clone()
        .unwrap_or_default()
        .into_iter()
        .chain(agent.args.clone().unwrap_or_default())
        .collect();
    assert_eq!(command, AGENT_COMMAND, "the agent's command line");
    assert!(command.iter().any(|a| a == "--kubernetes"));
    assert!(command.iter().any(|a| a == "--keep-on-exit"));
    // $(NODE_NAME) in the arguments is the downward API's spec.nodeName.
    let env = agent.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME in the agent's env");
    assert_eq!(node_name.value, None);
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.termination_grace_period_seconds
            .is_some_and(|s| s >= 10)
    );
}

#[test]
fn daemonset_mounts_bpffs_with_bidirectional_propagation_and_the_state_dir() {
    let ds = agent_daemonset();
    let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let agent = agent_container(&ds);
    let volumes = pod.volumes.clone().unwrap_or_default();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.clone())
            .unwrap_or_else(|| panic!("volume {name} is not a hostPath"))
    };
    let mounts = agent.volume_mounts.clone().unwrap_or_default();
    let mount_at = |path: &str| {
        mounts
            .iter()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
            .clone()
    };

    // The pins live on the node's bpffs, which the privileged init container mounts if the
    // node has none (Bidirectional, so the mount reaches the node and outlives the pod); the
    // agent only needs to see it.
    let bpffs = mount_at("/sys/fs/bpf");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_ne!(bpffs.read_only, Some(true));
    let source = host_path(&bpffs.name);
    assert_eq!(source.path, "/sys/fs/bpf");
    assert_eq!(source.type_.as_deref(), Some("DirectoryOrCreate"));
    let inits = pod.init_containers.clone().unwrap_or_default();
    assert_eq!(inits.len(), 1, "one init container: the bpffs mount");
    let init = &inits[0];
    let init_mounts = init.volume_mounts.clone().unwrap_or_default();
    assert!(
        init_mounts.iter().any(|m| m.name == bpffs.name
            && m.mount_path == "/sys/fs/bpf"
            && m.mount_propagation.as_deref() == Some("Bidirectional")),
        "{init_mounts:?}"
    );
    let script = init.command.clone().unwrap_or_default().join(" ");
    assert!(
        script.contains("mount -t bpf bpf /sys/fs/bpf") && script.contains("bpf_fs"),
        "mounts bpffs only where there is none: {script}"
    );
    // The API server rejects Bidirectional propagation outside privileged containers (the test
    // API server does not validate, so this is checked here).
    assert_eq!(
        init.security_context.as_ref().and_then(|s| s.privileged),
        Some(true),
        "Bidirectional mount propagation needs a privileged container"
    );
    // The agent itself: named capabilities, nothing else, a read-only root.
    let security = agent.security_context.clone().expect("a securityContext");
    assert_ne!(
        security.privileged,
        Some(true),
        "the agent is not privileged"
    );
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let caps = security.capabilities.expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    assert_eq!(
        caps.add.unwrap_or_default(),
        AGENT_CAPABILITIES,
        "the capabilities tests/tests/capabilities.rs runs the agent with"
    );

    // The state dir (--state-dir default) on the host, for `lb-agent status`.
    let state = mount_at("/run/xdplb");
    let source = host_path(&state.name);
    assert_eq!(source.path, "/run/xdplb");
    assert_eq!(source.type_.as_deref(), Some("DirectoryOrCreate"));

    // The pods' network namespaces, where the agent turns GRO on at each pod veth's end; pods
    // started after the agent must show up, hence HostToContainer.
    let netns = mount_at("/run/netns");
    assert_eq!(host_path(&netns.name).path, "/run/netns");
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(netns.read_only, Some(true));

    // --config /etc/xdplb/node.toml comes from the ConfigMap, mounted as a directory so that
    // updates reach the file.
    let config = mount_at("/etc/xdplb");
    assert_eq!(config.sub_path, None);
    let cm = volumes
        .iter()
        .find(|v| v.name == config.name)
        .and_then(|v| v.config_map.clone())
        .expect("/etc/xdplb is a ConfigMap volume");
    let configmap = node_config();
    assert_eq!(Some(cm.name), configmap.metadata.name);
    assert!(configmap.data.unwrap_or_default().contains_key("node.toml"));
}

#[test]
fn daemonset_probes_on_localhost_and_is_scraped_on_the_nodes_address() {
    let ds = agent_daemonset();
    let agent = agent_container(&ds);
    let http = |probe: &Option<k8s_openapi::api::core::v1::Probe>, what: &str| {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .unwrap_or_else(|| panic!("no HTTP {what} probe"));
        (
            get.host.unwrap_or_default(),
            get.path.unwrap_or_default(),
            get.port,
        )
    };
    let local = |path: &str| {
        (
            "127.0.0.1".to_string(),
            path.to_string(),
            IntOrString::Int(METRICS_PORT),
        )
    };
    assert_eq!(http(&agent.startup_probe, "startup"), local("/healthz"));
    assert_eq!(http(&agent.liveness_probe, "liveness"), local("/healthz"));
    assert_eq!(http(&agent.readiness_probe, "readiness"), local("/readyz"));
    let args = agent.args.clone().unwrap_or_default();
    let flag = |name: &str| {
        args.iter()
            .skip_while(|a| *a != name)
            .nth(1)
            .unwrap_or_else(|| panic!("{name}"))
            .clone()
    };
    assert_eq!(flag("--metrics-addr"), format!("127.0.0.1:{METRICS_PORT}"));
    assert_eq!(flag("--scrape-addr"), format!("$(HOST_IP):{METRICS_PORT}"));
    let env = agent.env.clone().unwrap_or_default();
    let host_ip = env.iter().find(|e| e.name == "HOST_IP").expect("HOST_IP");
    assert_eq!(
        host_ip
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("status.hostIP")
    );
    let ports = agent.ports.clone().unwrap_or_default();
    assert!(
        ports.iter().any(|p| p.container_port == METRICS_PORT),
        "the scrape port is declared"
    );
    let annotations = ds
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap_or_default();
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&METRICS_PORT.to_string())
    );
}

#[test]
fn daemonset_runs_on_linux_nodes_of_the_shipped_architectures_and_rolls_a_tenth_at_a_time() {
    let ds = agent_daemonset();
    let spec = ds.spec.clone().unwrap();
    let pod = spec.template.spec.clone().unwrap();
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "a toleration with operator Exists, no key and no effect: {tolerations:?}"
    );
    assert_eq!(
        pod.node_selector
            .clone()
            .unwrap_or_default()
            .get("kubernetes.io/os")
            .map(String::as_str),
        Some("linux")
    );
    let expressions = node_affinity(&ds);
    let strings = |v: &[&str]| {
        v.iter()
            .map(std::string::ToString::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        expressions["kubernetes.io/arch"],
        ("In".to_string(), strings(&["amd64", "arm64"])),
        "the architectures deploy/Dockerfile builds"
    );
    assert_eq!(
        expressions["eks.amazonaws.com/compute-type"],
        ("NotIn".to_string(), strings(&["fargate"]))
    );
    assert_eq!(
        expressions["xdplb.io/agent"],
        ("NotIn".to_string(), strings(&["canary", "disabled"])),
        "the canary DaemonSet's nodes are not this one's"
    );
    let strategy = spec.update_strategy.expect("an update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.expect("rollingUpdate");
    assert_eq!(
        rolling.max_unavailable,
        Some(IntOrString::String("10%".into()))
    );
    // Two agents on one node would drive the same pinned maps and links.
    assert!(
        matches!(rolling.max_surge, None | Some(IntOrString::Int(0))),
        "maxSurge must be 0"
    );
    // The selector selects the template.
    let labels = spec.template.metadata.unwrap().labels.unwrap_or_default();
    for (k, v) in spec.selector.match_labels.unwrap_or_default() {
        assert_eq!(labels.get(&k), Some(&v), "template label {k}");
    }
}

/// The DaemonSet's required node affinity (one term): key -> (operator, values).
fn node_affinity(ds: &DaemonSet) -> BTreeMap<String, (String, Vec<String>)> {
    let pod = ds.spec.clone().unwrap().template.spec.unwrap();
    let terms = pod
        .affinity
        .and_then(|a| a.node_affinity)
        .and_then(|n| n.required_during_scheduling_ignored_during_execution)
        .expect("a required node affinity")
        .node_selector_terms;
    assert_eq!(terms.len(), 1, "one term (terms are ORed)");
    terms[0]
        .match_expressions
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.key, (e.operator, e.values.unwrap_or_default())))
        .collect()
}

#[test]
fn daemonset_requests_and_limits_memory_for_its_bpf_maps() {
    let agent = agent_container(&agent_daemonset());
    let resources = agent.resources.expect("resources");
    let requests = resources.requests.expect("requests");
    let limits = resources.limits.expect("limits");
    let memory = |m: &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
        bytes(&m.get("memory").expect("memory").0)
    };
    assert!(requests.contains_key("cpu"));
    // Map memory is charged to the pod's memory cgroup: the default sizes take 128.5 MiB
    // (flows 46, rings 66, sources 8, affinity 6.5, the rest 2; see daemonset.yaml).
    let maps = 128 << 20;
    assert!(memory(&requests) > maps, "the request covers the maps");
    assert!(memory(&limits) >= memory(&requests));
    assert!(
        memory(&limits) >= maps + (128 << 20),
        "the limit leaves room over the maps for per-CPU maps, loading and the agent"
    );
}

// ---------------------------------------------------------------------------------------------
// RBAC.
// ---------------------------------------------------------------------------------------------

#[test]
fn cluster_role_grants_exactly_what_the_agent_uses() {
    let role = one("base/clusterrole.yaml", |o| match o {
        Object::ClusterRole(r) => Some(r),
        _ => None,
    });
    assert!(role.aggregation_rule.is_none());
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    assert_ne!(verb, "*");
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    // The agent's API calls: watchers (list + watch) on Services, EndpointSlices and its own
    // Node (lb-userspace/src/k8s/watch.rs), and core/v1 Events it creates and patches to count a
    // problem again (lb-userspace/src/k8s/events.rs).
    let read = |file: &str| {
        fs::read_to_string(workspace_root().join("lb-userspace/src/k8s").join(file)).expect(file)
    };
    let source = read("watch.rs");
    assert!(source.contains("Api<KubeService> = Api::all("));
    assert!(source.contains("Api<EndpointSlice> = Api::all("));
    assert!(source.contains("Api<Node> = Api::all("));
    assert!(
        !source.contains("api.get(") && !source.contains(".patch(") && !source.contains(".create("),
        "the agent gets, patches or creates objects now: grant it in clusterrole.yaml"
    );
    let source = read("events.rs");
    assert!(source.contains("Api<KubeEvent> = Api::namespaced("));
    assert!(source.contains("api.create(&PostParams::default(), &event)"));
    assert!(source.contains("api.patch(&name, &PatchParams::default(), &Patch::Merge("));
    assert!(
        !source.contains("api.get(") && !source.contains(".delete("),
        "the agent gets or deletes Events now: grant it in clusterrole.yaml"
    );
    let mut expected = BTreeSet::new();
    for verb in ["list", "watch"] {
        expected.insert((String::new(), "services".into(), verb.into()));
        expected.insert((
            "discovery.k8s.io".into(),
            "endpointslices".into(),
            verb.into(),
        ));
        expected.insert((String::new(), "nodes".into(), verb.into()));
    }
    for verb in ["create", "patch"] {
        expected.insert((String::new(), "events".into(), verb.into()));
    }
    assert_eq!(granted, expected);
}

#[test]
fn binding_gives_the_role_to_the_daemonsets_service_account() {
    let role = one("base/clusterrole.yaml", |o| match o {
        Object::ClusterRole(r) => Some(r),
        _ => None,
    });
    let binding = one("base/clusterrolebinding.yaml", |o| match o {
        Object::ClusterRoleBinding(b) => Some(b),
        _ => None,
    });
    let account = one("base/serviceaccount.yaml", |o| match o {
        Object::ServiceAccount(a) => Some(a),
        _ => None,
    });
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
    let ds = agent_daemonset();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name, account.metadata.name);
    assert_ne!(pod.automount_service_account_token, Some(false));
}

// ---------------------------------------------------------------------------------------------
// The node settings.
// ---------------------------------------------------------------------------------------------

#[test]
fn node_settings_pass_the_agents_own_parser_and_set_the_hash_seed() {
    let configmap = node_config();
    let data = configmap.data.unwrap_or_default();
    let text = data.get("node.toml").expect("node.toml in the ConfigMap");
    let desired = lb_userspace::config::parse(Path::new("node.toml"), text)
        .unwrap_or_else(|e| panic!("deploy/base/node.toml: {e}"));
    assert!(
        desired.services.is_empty(),
        "no [[services]]: in Kubernetes mode Services come from the API"
    );
    // Set explicitly (not left to the built-in default), so it is visibly one value for every
    // node.
    let seed_line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("hash-seed"))
        .expect("a hash-seed line");
    let seed: u32 = seed_line
        .split_once('=')
        .and_then(|(_, v)| v.split('#').next())
        .and_then(|v| v.trim().parse().ok())
        .expect("hash-seed = <number>");
    assert_eq!(desired.node.hash_seed, seed);
    assert!(!desired.policies.is_empty(), "example rate-limit policies");
}

// ---------------------------------------------------------------------------------------------
// Kustomizations, README, Dockerfile.
// ---------------------------------------------------------------------------------------------

#[test]
fn each_kustomization_lists_every_manifest_beside_it() {
    let files = yaml_files();
    let dirs: BTreeSet<PathBuf> = files
        .iter()
        .map(|f| f.parent().unwrap().to_path_buf())
        .collect();
    assert!(dirs.contains(&deploy_dir()));
    for dir in dirs {
        let kustomization = dir.join("kustomization.yaml");
        assert!(
            kustomization.exists(),
            "{} has manifests but no kustomization.yaml",
            relative(&dir)
        );
        let doc = documents(&kustomization).pop().expect("a kustomization");
        assert_eq!(doc["kind"], "Kustomization");
        let listed: Vec<String> = doc["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .map(|r| r.as_str().expect("a path").to_string())
            .collect();
        let unique: BTreeSet<String> = listed.iter().cloned().collect();
        assert_eq!(unique.len(), listed.len(), "a resource listed twice");
        // Other kustomizations (directories) must be ones; files must be the manifests here.
        let (dirs, files_listed): (BTreeSet<String>, BTreeSet<String>) =
            unique.into_iter().partition(|r| dir.join(r).is_dir());
        for d in &dirs {
            assert!(
                dir.join(d).join("kustomization.yaml").exists(),
                "{}: {d} is no kustomization",
                relative(&kustomization)
            );
        }
        let present: BTreeSet<String> = files
            .iter()
            .filter(|f| f.parent() == Some(dir.as_path()) && !is_kustomization(f))
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files_listed, present, "{}", relative(&kustomization));
        for g in doc["configMapGenerator"].as_array().into_iter().flatten() {
            for f in g["files"].as_array().into_iter().flatten() {
                let f = f.as_str().expect("a file name");
                assert!(
                    dir.join(f).exists(),
                    "{}: {f} is missing",
                    relative(&kustomization)
                );
            }
        }
    }
}

/// `kubectl kustomize DIR` as JSON values, or None (with "skipped: ...") without kubectl; under
/// CI=true that is a failure.
fn kustomize(dir: &str) -> Option<Vec<Value>> {
    let out = match std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir().join(dir))
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "kubectl is needed to render deploy/ and CI=true forbids skipping: {e}"
            );
            eprintln!("skipped: no kubectl to render deploy/{dir} ({e})");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("kubectl kustomize deploy/{dir}: not YAML: {e}"));
    Some(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn rendered_daemonset(docs: &[Value], name: &str) -> DaemonSet {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no DaemonSet {name}"));
    typed(&format!("rendered DaemonSet {name}"), doc)
}

/// The ConfigMap a rendered DaemonSet mounts is in the same rendering, under kustomize's
/// hashed name, with the node settings.
fn mounts_the_generated_node_config(docs: &[Value], ds: &DaemonSet) {
    let pod = ds.spec.clone().unwrap().template.spec.unwrap();
    let volume = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find_map(|v| v.config_map)
        .expect("a ConfigMap volume");
    assert!(
        volume.name.starts_with("xdplb-node-config-")
            && volume.name.len() > "xdplb-node-config-".len(),
        "kustomize's hashed name: {}",
        volume.name
    );
    let cm: ConfigMap = typed(
        "rendered ConfigMap",
        docs.iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == volume.name.as_str())
            .expect("the mounted ConfigMap is rendered"),
    );
    let text = fs::read_to_string(deploy_dir().join("base/node.toml")).unwrap();
    assert_eq!(cm.data.unwrap_or_default().get("node.toml"), Some(&text));
}

#[test]
fn kustomize_renders_the_install_the_canary_and_the_uninstall_helper() {
    let Some(install) = kustomize(".") else {
        return;
    };
    let kinds: BTreeSet<String> = install
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "ServiceAccount"
        ]
        .map(String::from)
        .into(),
    );
    let ds = rendered_daemonset(&install, "lb-agent");
    mounts_the_generated_node_config(&install, &ds);
    let pod = ds.spec.clone().unwrap().template.spec.unwrap();
    for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
        assert_eq!(c.image.as_deref(), Some(IMAGE), "{}", c.name);
    }
    // A change of the node settings changes the pod template (a rollout), through the name.
    let rendered_again = kustomize(".").unwrap();
    assert_eq!(
        rendered_daemonset(&rendered_again, "lb-agent"),
        ds,
        "deterministic"
    );

    // The canary: its own DaemonSet on the canary nodes only, same settings, nothing else that
    // the install owns.
    let canary = kustomize("canary").unwrap();
    let kinds: Vec<&str> = canary.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "DaemonSet"], "{kinds:?}");
    let cds = rendered_daemonset(&canary, "lb-agent-canary");
    mounts_the_generated_node_config(&canary, &cds);
    assert_eq!(
        node_affinity(&cds)["xdplb.io/agent"],
        ("In".to_string(), vec!["canary".to_string()])
    );
    assert_eq!(
        node_affinity(&ds)["xdplb.io/agent"].0,
        "NotIn",
        "the main DaemonSet keeps off the canary nodes"
    );
    let selector = cds
        .spec
        .clone()
        .unwrap()
        .selector
        .match_labels
        .unwrap_or_default();
    let labels = cds
        .spec
        .clone()
        .unwrap()
        .template
        .metadata
        .unwrap()
        .labels
        .unwrap_or_default();
    assert_eq!(
        selector.get("xdplb.io/track").map(String::as_str),
        Some("canary")
    );
    for (k, v) in selector {
        assert_eq!(labels.get(&k), Some(&v), "canary template label {k}");
    }
    // Otherwise the same pod.
    let strip = |ds: &DaemonSet| {
        let mut pod = ds.spec.clone().unwrap().template.spec.unwrap();
        pod.affinity = None;
        pod
    };
    assert_eq!(strip(&cds), strip(&ds));

    let uninstall = kustomize("uninstall").unwrap();
    let cleanup = rendered_daemonset(&uninstall, "lb-agent-cleanup");
    let pod = cleanup.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.host_network,
        Some(true),
        "classic TC filters are in the node's netns"
    );
}

#[test]
fn readme_documents_the_command_line_annotations_and_placeholder_image() {
    let readme = fs::read_to_string(deploy_dir().join("README.md")).expect("deploy/README.md");
    for annotation in ANNOTATIONS {
        assert!(
            readme.contains(&format!("`{annotation}`")),
            "README.md does not list `{annotation}`"
        );
    }
    assert!(readme.contains(IMAGE));
    for flag in AGENT_COMMAND.iter().filter(|a| a.starts_with("--")) {
        assert!(readme.contains(flag), "README.md does not mention {flag}");
    }
    // The cleanup helper runs the same image.
    let cleanup = one("uninstall/cleanup-daemonset.yaml", |o| match o {
        Object::DaemonSet(d) => Some(d.as_ref()),
        _ => None,
    });
    let pod = cleanup.spec.unwrap().template.spec.unwrap();
    for c in pod
        .init_containers
        .unwrap_or_default()
        .iter()
        .chain(&pod.containers)
    {
        assert_eq!(c.image.as_deref(), Some(IMAGE), "{}", c.name);
    }
}

/// The Dockerfile's instructions: (instruction, arguments), continuation lines joined, comments
/// dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = fs::read_to_string(deploy_dir().join("Dockerfile")).expect("deploy/Dockerfile");
    let mut out: Vec<(String, String)> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') && pending.is_empty() || line.is_empty() {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
        } else {
            pending.push_str(line);
            let (instruction, rest) = pending.split_once(' ').unwrap_or((&pending, ""));
            out.push((instruction.to_uppercase(), rest.trim().to_string()));
            pending.clear();
        }
    }
    out
}

#[test]
fn dockerfile_builds_with_xtasks_setup_and_build_command_for_both_architectures() {
    let steps = dockerfile();
    let xtask = fs::read_to_string(workspace_root().join("xtask/src/main.rs")).unwrap();
    // xtask's agent build command, as it builds the arm64 agent in the k8s tier.
    let build: Vec<String> = xtask
        .split_once("const AGENT_BUILD: &[&str] = &[")
        .and_then(|(_, rest)| rest.split_once("];"))
        .expect("xtask's AGENT_BUILD")
        .0
        .split('"')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    assert!(build.contains(&"--locked".to_string()), "{build:?}");
    let runs: Vec<&str> = steps
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, r)| r.as_str())
        .collect();
    let cargo_calls: Vec<Vec<&str>> = runs
        .iter()
        .flat_map(|r| r.split(';'))
        .map(|c| c.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.first() == Some(&"cargo"))
        .collect();
    // The toolchain comes from xtask's own set-up (rust-toolchain-bpf.toml's pins), copied in
    // before it runs; every other cargo call is locked.
    assert!(
        cargo_calls.iter().any(|c| c[1..] == ["xtask", "setup"]),
        "{cargo_calls:?}"
    );
    let copied_before_setup = steps
        .iter()
        .take_while(|(i, r)| !(i == "RUN" && r.contains("cargo xtask setup")))
        .any(|(i, r)| i == "COPY" && r.contains("rust-toolchain-bpf.toml"));
    assert!(
        copied_before_setup,
        "the pins are copied before the set-up runs"
    );
    for c in cargo_calls.iter().filter(|c| c[1] != "xtask") {
        assert!(c.contains(&"--locked"), "not --locked: {c:?}");
    }
    let agent = cargo_calls
        .iter()
        .find(|c| c[1] == "build")
        .expect("a cargo build of the agent");
    assert_eq!(agent[1..=build.len()], build, "xtask's build command");
    assert_eq!(
        &agent[build.len() + 1..],
        ["--release", "--target", "\"$target\""]
    );
    // The dependencies are fetched in a layer of their own, before the sources come in.
    let fetch = steps
        .iter()
        .position(|(i, r)| i == "RUN" && r.contains("cargo fetch --locked"));
    let sources = steps.iter().position(|(i, r)| i == "COPY" && r == ". .");
    assert!(
        fetch.is_some() && fetch < sources,
        "dependency layer before COPY . ."
    );
    // Both architectures the DaemonSet schedules on.
    let build_run = runs.iter().find(|r| r.contains("cargo build")).unwrap();
    for (arch, target) in [
        ("amd64", "x86_64-unknown-linux-gnu"),
        ("arm64", "aarch64-unknown-linux-gnu"),
    ] {
        assert!(
            build_run.contains(&format!("{arch}) target={target}")),
            "{arch} -> {target}"
        );
    }
    let stages: Vec<&str> = steps
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(
        stages[0].starts_with("--platform=$BUILDPLATFORM rust:1.95-bookworm"),
        "the builder runs natively and cross-compiles: {}",
        stages[0]
    );
    assert!(
        stages[1].starts_with("debian:bookworm-slim"),
        "{}",
        stages[1]
    );
    // The workspace's host toolchain.
    let manifest = fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("rust-version = \"1.95\""));
    // Only the agent goes into the image.
    let copies: Vec<&str> = steps
        .iter()
        .filter(|(i, r)| i == "COPY" && r.starts_with("--from="))
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(
        copies,
        ["--from=build /out/lb-agent /usr/local/bin/lb-agent"]
    );
}

#[test]
fn the_nightly_is_pinned_by_date_in_one_place() {
    let pins = fs::read_to_string(workspace_root().join("rust-toolchain-bpf.toml")).unwrap();
    let channel = pins
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = \"nightly-"))
        .and_then(|r| r.strip_suffix('"'))
        .expect("channel = \"nightly-YYYY-MM-DD\"");
    assert!(
        channel.len() == 10 && channel.chars().filter(|c| *c == '-').count() == 2,
        "a dated nightly: {channel}"
    );
    assert!(
        !workspace_root().join("rust-toolchain.toml").exists()
            && !workspace_root().join("rust-toolchain").exists(),
        "a root toolchain file would switch the host build to the nightly"
    );
    // Nobody else names a nightly: the build script, xtask and the Dockerfile read the pins.
    for file in [
        "lb-userspace/build.rs",
        "xtask/src/main.rs",
        "deploy/Dockerfile",
    ] {
        let text = fs::read_to_string(workspace_root().join(file)).unwrap();
        assert!(
            !text.contains("nightly-20"),
            "{file} names a dated nightly of its own"
        );
        assert!(
            text.contains("rust-toolchain-bpf.toml"),
            "{file} does not take the pins from rust-toolchain-bpf.toml"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A real API server.
// ---------------------------------------------------------------------------------------------

const FIELD_MANAGER: &str = "xdplb-manifests-test";

/// The test API server, or None (with "skipped: ...") when it cannot be built here; under
/// CI=true that is a failure.
fn api_server() -> Option<lb_tests::apiserver::TestApiServer> {
    if let Err(e) = lb_tests::apiserver::binaries() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "the test API server (tests/k8s-apiserver/build.sh) could not be built, and CI=true forbids skipping: {e:#}"
        );
        eprintln!(
            "skipped: the test API server (tests/k8s-apiserver/build.sh) could not be built: {e:#}"
        );
        return None;
    }
    Some(lb_tests::apiserver::TestApiServer::start().expect("starting the test API server"))
}

/// Server-side applies `object`, reads it back, checks that every field sent came back
/// unchanged and that a second apply changes nothing.
async fn apply_and_read_back<K>(api: kube::Api<K>, object: &K, file: &str)
where
    K: kube::Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = object.meta().name.clone().expect("a name");
    let params = kube::api::PatchParams::apply(FIELD_MANAGER).force();
    let applied = api
        .patch(&name, &params, &kube::api::Patch::Apply(object))
        .await
        .unwrap_or_else(|e| panic!("{file}: server-side apply of {name}: {e}"));
    let got = api
        .get(&name)
        .await
        .unwrap_or_else(|e| panic!("{file}: reading {name} back: {e}"));
    let sent = serde_json::to_value(object).unwrap();
    let got_value = serde_json::to_value(&got).unwrap();
    if let Some(diff) = first_missing(&sent, &got_value, "") {
        panic!("{file}: {name} came back different: {diff}");
    }
    let managers: Vec<String> = got
        .meta()
        .managed_fields
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(
        managers,
        [FIELD_MANAGER],
        "{file}: {name}: fields owned by apply"
    );
    let again = api
        .patch(&name, &params, &kube::api::Patch::Apply(object))
        .await
        .unwrap_or_else(|e| panic!("{file}: re-applying {name}: {e}"));
    assert_eq!(
        again.meta().resource_version,
        applied.meta().resource_version,
        "{file}: re-applying {name} unchanged changed it"
    );
}

/// Where a field of `sent` is missing from or different in `got` (server additions are fine).
fn first_missing(sent: &Value, got: &Value, path: &str) -> Option<String> {
    match (sent, got) {
        (Value::Object(s), Value::Object(g)) => s.iter().find_map(|(k, v)| {
            let here = format!("{path}.{k}");
            match g.get(k) {
                Some(w) => first_missing(v, w, &here),
                None => Some(format!("{here} is missing")),
            }
        }),
        (Value::Array(s), Value::Array(g)) if s.len() == g.len() => s
            .iter()
            .zip(g)
            .enumerate()
            .find_map(|(i, (a, b))| first_missing(a, b, &format!("{path}[{i}]"))),
        _ if sent == got => None,
        _ => Some(format!("{path}: sent {sent}, got {got}")),
    }
}

#[test]
fn api_server_takes_the_manifests_by_server_side_apply() {
    let Some(server) = api_server() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig_path())
            .expect("the test server's kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("a client config");
        let client = kube::Client::try_from(config).expect("a client");
        let mut objects = objects();
        // kustomize's order: namespaces first, workloads last.
        objects.sort_by_key(|(_, o)| match o {
            Object::Namespace(_) => 0,
            Object::ServiceAccount(_) => 1,
            Object::ClusterRole(_) => 2,
            Object::ClusterRoleBinding(_) => 3,
            Object::ConfigMap(_) => 4,
            Object::DaemonSet(_) => 5,
        });
        let ns = |meta: &ObjectMeta| meta.namespace.clone().expect("a namespaced object");
        for (file, object) in &objects {
            let c = client.clone();
            match object {
                Object::Namespace(o) => apply_and_read_back(kube::Api::all(c), o, file).await,
                Object::ClusterRole(o) => apply_and_read_back(kube::Api::all(c), o, file).await,
                Object::ClusterRoleBinding(o) => {
                    apply_and_read_back(kube::Api::all(c), o, file).await;
                }
                Object::ServiceAccount(o) => {
                    let api = kube::Api::namespaced(c, &ns(&o.metadata));
                    apply_and_read_back(api, o, file).await;
                }
                Object::ConfigMap(o) => {
                    let api = kube::Api::namespaced(c, &ns(&o.metadata));
                    apply_and_read_back(api, o, file).await;
                }
                Object::DaemonSet(o) => {
                    let api = kube::Api::namespaced(c, &ns(&o.metadata));
                    apply_and_read_back(api, o.as_ref(), file).await;
                }
            }
        }
        // What the DaemonSet refers to exists on the server.
        let ds: DaemonSet = kube::Api::namespaced(client.clone(), NAMESPACE)
            .get("lb-agent")
            .await
            .expect("the DaemonSet");
        assert!(ds.metadata.generation.is_some_and(|g| g >= 1));
        let pod = ds.spec.unwrap().template.spec.unwrap();
        let account = pod.service_account_name.expect("a service account");
        kube::Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
            .get(&account)
            .await
            .expect("the DaemonSet's ServiceAccount exists");
        for volume in pod.volumes.unwrap_or_default() {
            if let Some(cm) = volume.config_map {
                kube::Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE)
                    .get(&cm.name)
                    .await
                    .expect("the DaemonSet's ConfigMap exists");
            }
        }
        let binding: ClusterRoleBinding = kube::Api::all(client.clone())
            .get("xdplb-lb-agent")
            .await
            .expect("the binding");
        let role: ClusterRole = kube::Api::all(client)
            .get(&binding.role_ref.name)
            .await
            .expect("the bound ClusterRole exists");
        // Services, EndpointSlices, Nodes, Events.
        assert_eq!(role.rules.map(|r| r.len()), Some(4));
    });
}
