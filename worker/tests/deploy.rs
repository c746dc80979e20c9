//! The deployment files say what the worker actually does: the stream and group KEDA watches are
//! the ones workers consume, the rules are mounted where workers read them (as a directory, so
//! updates arrive), every secret key referenced is documented, and docker-compose runs the
//! services the README promises. No Docker or Kubernetes here: this reads the files.

use infra::config::Vars;
use serde_yaml::Value;

mod deploy_files;
use deploy_files::{deploy, documents};

fn k8s(file: &str) -> Vec<Value> {
    documents(&deploy().join("k8s").join(file))
}

fn defaults() -> worker::Config {
    worker::Config::from_vars(&Vars::from_map::<&str, &str>([])).unwrap()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"] == name)
}

#[test]
fn every_manifest_parses_and_kustomize_lists_the_existing_files() {
    let kustomization = &k8s("kustomization.yaml")[0];
    for resource in kustomization["resources"].as_sequence().unwrap() {
        assert!(
            deploy().join("k8s").join(str_of(resource)).is_file(),
            "{resource:?} listed but missing"
        );
    }
    for entry in std::fs::read_dir(deploy().join("k8s")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            for doc in documents(&path) {
                assert!(doc["kind"].is_string(), "{}: a kind", path.display());
            }
        }
    }
}

#[test]
fn keda_watches_the_stream_and_group_the_workers_consume() {
    let config = defaults();
    let scaled = &k8s("keda-scaledobject.yaml")[0];
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "worker");
    let triggers = scaled["spec"]["triggers"].as_sequence().unwrap();
    assert!(
        triggers
            .iter()
            .any(|t| t["metadata"]["lagCount"].is_string()
                && t["metadata"]["activationLagCount"].is_string())
    );
    assert!(
        triggers
            .iter()
            .any(|t| t["metadata"]["pendingEntriesCount"].is_string())
    );
    let worker = &k8s("worker.yaml")[0];
    for trigger in triggers {
        let meta = &trigger["metadata"];
        assert_eq!(trigger["type"], "redis-streams");
        assert_eq!(str_of(&meta["stream"]), config.queue_name);
        assert_eq!(str_of(&meta["consumerGroup"]), config.consumer_group);
        let address_var = str_of(&meta["addressFromEnv"]);
        assert!(
            env_value(container(worker), address_var).is_some(),
            "KEDA reads {address_var} from the worker container"
        );
    }
}

#[test]
fn rules_are_mounted_as_a_directory_where_workers_and_the_api_read_them() {
    for file in ["worker.yaml", "api.yaml"] {
        rules_mounted_as_a_directory(&k8s(file)[0]);
    }
    let compose = &documents(&deploy().join("docker-compose.yml"))[0];
    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    let image_rules_dir = dockerfile
        .split_whitespace()
        .find_map(|w| w.strip_prefix("RULES_DIR="))
        .expect("the image sets RULES_DIR");
    for service in ["worker", "api"] {
        let volumes = compose["services"][service]["volumes"]
            .as_sequence()
            .unwrap_or_else(|| panic!("compose mounts the rules in {service}"));
        assert!(
            volumes
                .iter()
                .any(|v| str_of(v).starts_with(&format!("../rules:{image_rules_dir}"))),
            "compose mounts ../rules where the image's {service} reads rules"
        );
    }
}

/// `deployment` mounts the `rules` ConfigMap, whole, at its container's `RULES_DIR`.
fn rules_mounted_as_a_directory(deployment: &Value) {
    let c = container(deployment);
    let rules_dir = str_of(&env_value(c, "RULES_DIR").unwrap()["value"]);
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == rules_dir)
        .expect("a volume mounted at RULES_DIR");
    assert!(
        mount.get("subPath").is_none(),
        "subPath mounts never receive ConfigMap updates"
    );
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["configMap"]["name"], "rules");
}

#[test]
fn probes_use_the_health_routes_and_secrets_are_documented() {
    let secret = &k8s("secret.example.yaml")[0];
    let api = &k8s("api.yaml")[0];
    let worker = &k8s("worker.yaml")[0];
    for (deployment, port) in [(api, 8000), (worker, 9100)] {
        let c = container(deployment);
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health");
        let port_name = &c["readinessProbe"]["httpGet"]["port"];
        assert!(
            c["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|p| &p["name"] == port_name && p["containerPort"] == port)
        );
        for var in c["env"].as_sequence().unwrap() {
            if let Some(key) = var["valueFrom"]["secretKeyRef"]["key"].as_str() {
                assert!(
                    secret["stringData"].get(key).is_some(),
                    "secret.example.yaml documents {key}"
                );
            }
        }
    }
}

/// Containers check their own health with the binaries' `healthcheck` subcommands (the image
/// has no curl): the image's HEALTHCHECK asks the api (its default command), compose asks each
/// service with its own binary, and the one-shot migration has none.
#[test]
fn container_healthchecks_use_the_healthcheck_subcommands() {
    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    let healthcheck = dockerfile
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK "))
        .expect("the Dockerfile declares a HEALTHCHECK");
    assert!(
        healthcheck.ends_with(r#"CMD ["api", "healthcheck"]"#),
        "{healthcheck}"
    );
    assert!(dockerfile.contains(r#"CMD ["api"]"#));
    let compose = &documents(&deploy().join("docker-compose.yml"))[0];
    let services = &compose["services"];
    for (service, binary) in [("api", "api"), ("worker", "worker")] {
        let expected = serde_yaml::from_str::<Value>(&format!("[CMD, {binary}, healthcheck]"));
        assert_eq!(
            services[service]["healthcheck"]["test"],
            expected.unwrap(),
            "{service}"
        );
    }
    assert_eq!(services["migrate"]["healthcheck"]["disable"], true);
}

#[test]
fn compose_runs_the_promised_services() {
    let compose = &documents(&deploy().join("docker-compose.yml"))[0];
    let services = &compose["services"];
    assert!(str_of(&services["db"]["image"]).starts_with("postgres:15"));
    assert!(str_of(&services["redis"]["image"]).starts_with("redis:7"));
    for s in ["db", "redis"] {
        assert!(
            services[s]["healthcheck"]["test"].is_sequence(),
            "{s} healthcheck"
        );
    }
    assert_eq!(
        services["migrate"]["command"],
        serde_yaml::from_str::<Value>("[migration, up]").unwrap()
    );
    for s in ["api", "worker"] {
        assert_eq!(
            services[s]["depends_on"]["migrate"]["condition"],
            "service_completed_successfully"
        );
    }
    assert_eq!(services["api"]["ports"][0], "8000:8000");
    assert!(services["worker"]["deploy"]["replicas"].as_u64().unwrap() > 1);
}
