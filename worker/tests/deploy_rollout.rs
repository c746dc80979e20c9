//! The deployments survive a real cluster's day: the api drains before its listener closes,
//! disruptions take one pod at a time, KEDA alone sets the worker count, every pod runs
//! hardened; and Docker Compose's Redis and Postgres serve the quick start at `.env.example`'s
//! addresses. Reads the files (`deploy/k8s/validate.sh` checks them against the API schemas).

use serde_yaml::Value;

mod deploy_files;
use deploy_files::{deploy, documents};

/// Seconds the api gives requests in flight once SIGTERM arrives (its graceful shutdown).
const API_REQUEST_GRACE_S: u64 = 10;

/// The one object of `kind` in deploy/k8s/`file`.
fn object(file: &str, kind: &str) -> Value {
    let mut found: Vec<Value> = documents(&deploy().join("k8s").join(file))
        .into_iter()
        .filter(|doc| doc["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} in {file}");
    found.remove(0)
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn seconds(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("a number of seconds: {v:?}"))
}

#[test]
fn the_api_drains_before_its_listener_closes() {
    let api = object("api.yaml", "Deployment");
    let pod = pod_spec(&api);
    let command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .expect("a preStop exec command");
    assert_eq!(command[0], "sleep");
    let pause: u64 = command[1].as_str().unwrap().parse().unwrap();
    assert!(pause >= 5, "endpoints need a few seconds to drop the pod");
    assert!(
        seconds(&pod["terminationGracePeriodSeconds"]) > pause + API_REQUEST_GRACE_S,
        "the grace period covers the pause and the requests in flight"
    );
    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("FROM debian:"),
        "the runtime image has /bin/sleep for the preStop pause"
    );
}

#[test]
fn disruptions_take_one_pod_at_a_time_and_keda_owns_the_worker_count() {
    for (file, name) in [("api.yaml", "api"), ("worker.yaml", "worker")] {
        let deployment = object(file, "Deployment");
        let budget = object(file, "PodDisruptionBudget");
        assert_eq!(budget["metadata"]["name"], name);
        assert_eq!(
            budget["spec"]["selector"]["matchLabels"],
            deployment["spec"]["selector"]["matchLabels"],
            "{name}'s budget selects its pods"
        );
        assert_eq!(budget["spec"]["maxUnavailable"], 1);
        assert!(
            budget["spec"].get("minAvailable").is_none(),
            "minAvailable would block draining a single replica"
        );
    }
    let worker = object("worker.yaml", "Deployment");
    assert!(
        worker["spec"].get("replicas").is_none(),
        "every kubectl apply would reset KEDA's count"
    );
    let scaled = object("keda-scaledobject.yaml", "ScaledObject");
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"],
        worker["metadata"]["name"]
    );
}

#[test]
fn every_pod_runs_hardened() {
    let workloads = [
        object("api.yaml", "Deployment"),
        object("worker.yaml", "Deployment"),
        object("migrate-job.yaml", "Job"),
    ];
    for workload in &workloads {
        let name = &workload["metadata"]["name"];
        let pod = pod_spec(workload);
        let security = &pod["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{name:?}");
        assert_eq!(
            security["seccompProfile"]["type"], "RuntimeDefault",
            "{name:?}"
        );
        for container in pod["containers"].as_sequence().unwrap() {
            let security = &container["securityContext"];
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name:?}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{name:?}");
            assert_eq!(
                security["capabilities"]["drop"],
                serde_yaml::from_str::<Value>("[ALL]").unwrap(),
                "{name:?}"
            );
        }
    }
    let job = &workloads[2];
    assert!(seconds(&job["spec"]["ttlSecondsAfterFinished"]) > 0);
}

/// `NAME=value` of `.env.example`.
fn env_example(name: &str) -> String {
    let text = std::fs::read_to_string(deploy().join("../.env.example")).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!(".env.example sets {name}"))
        .to_string()
}

/// The host side of a compose port mapping `127.0.0.1:${VAR:-default}:container`.
fn published(service: &Value, container_port: u16) -> (String, u16) {
    let mapping = service["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .find(|p| p.ends_with(&format!(":{container_port}")))
        .unwrap_or_else(|| panic!("port {container_port} published"));
    let (host, rest) = mapping.split_once(':').unwrap();
    let port = rest
        .rsplit_once(':')
        .unwrap()
        .0
        .trim_start_matches("${")
        .trim_end_matches('}');
    let port = port.rsplit(":-").next().unwrap().parse().unwrap();
    (host.to_string(), port)
}

#[test]
fn compose_serves_the_quick_start_at_env_example_addresses() {
    let compose = &documents(&deploy().join("docker-compose.yml"))[0];
    let services = &compose["services"];

    let (host, port) = published(&services["redis"], 6379);
    assert_eq!(
        host, "127.0.0.1",
        "published on the loopback interface only"
    );
    assert_eq!(
        env_example("REDIS_URL"),
        format!("redis://127.0.0.1:{port}")
    );

    let (host, port) = published(&services["db"], 5432);
    assert_eq!(
        host, "127.0.0.1",
        "published on the loopback interface only"
    );
    let database_url = env_example("DATABASE_URL");
    assert_eq!(
        database_url,
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );
    // No password in DATABASE_URL: the server must let `postgres` in without one.
    let db_env = &services["db"]["environment"];
    assert_eq!(db_env["POSTGRES_HOST_AUTH_METHOD"], "trust");
    assert!(db_env.get("POSTGRES_DB").is_none() && db_env.get("POSTGRES_USER").is_none());
    // The compose pipeline stores into the same database the quick start reads.
    for service in ["api", "worker", "migrate"] {
        assert_eq!(
            services[service]["environment"]["DATABASE_URL"],
            "postgres://postgres@db:5432/postgres",
            "{service}"
        );
    }
}
