//! `microcosm bench` end to end with real processes: a two-run sweep on its own local
//! cluster, its results file, and the sink files it keeps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::cli_with_timeout;

/// A small sweep (a paced run, then an unthrottled one) with `--keep`: both runs finish
/// verified, `results.json` holds one entry per run with its latency and processes, and
/// every run's sink files are in the kept cluster directory when the sweep ends.
#[test]
fn a_small_sweep_measures_verifies_and_keeps_every_run_until_the_end() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = cli_with_timeout(
        [
            "bench",
            "--rates",
            "4000,0",
            "--ddl-freqs",
            "100",
            "--table-num",
            "4",
            "--binlog-num",
            "2",
            "--warmup-secs",
            "0.2",
            "--duration-secs",
            "0.5",
            "--max-rate-rcd-cnt",
            "2000",
            "--floor-secs",
            "0",
            "--idle-secs",
            "0",
            "--keep",
            "--out",
            out_dir.path().to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    let kept = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("cluster dir kept: "))
        .map(|d| Path::new(d.trim()).to_path_buf());
    // Remove the kept cluster directory whatever the assertions below find.
    struct Cleanup(Option<std::path::PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(dir) = &self.0 {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    let _cleanup = Cleanup(kept.clone());
    assert!(out.success(), "{out}");
    let kept = kept.expect("the bench names the kept cluster dir");

    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.path().join("results.json")).unwrap(),
    )
    .unwrap();
    let runs = results["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{results}");
    for (run, rate) in runs.iter().zip([4000, 0]) {
        assert_eq!(run["rate"], rate, "{run}");
        assert_eq!(run["state"], "Finished", "{run}");
        assert_eq!(run["verified"], true, "{run}");
        assert_eq!(
            run["data_rows"],
            4 * run["rcd_cnt"].as_u64().unwrap(),
            "{run}"
        );
        assert!(run["latency"]["p50_us"].as_f64().unwrap() > 0.0, "{run}");
        let processes = run["processes"].as_array().unwrap();
        assert_eq!(processes.len(), 3, "{run}");
        // Per kind of thread: the executors' engine workers, with what they did in the run.
        for executor in processes.iter().filter(|p| p["name"] != "master-1") {
            let worker = executor["threads"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == "microcosm-worke")
                .unwrap_or_else(|| panic!("no engine worker in {executor}"));
            assert!(worker["threads"].as_u64().unwrap() >= 1, "{worker}");
            assert!(worker["voluntary_switches_per_s"].is_number(), "{worker}");
            assert!(worker["involuntary_switches_per_s"].is_number(), "{worker}");
            // How long they waited for a vCPU, where the kernel keeps schedstat.
            if std::path::Path::new("/proc/self/schedstat").exists() {
                let waited = worker["waited_ms_per_s"].as_f64().expect("waited_ms_per_s");
                assert!((0.0..=1000.0 * 64.0).contains(&waited), "{worker}");
            }
        }
        // How each executor's engine workers spent the run: on a CPU, waiting for one,
        // asleep (the engine's own count, over GetExecutorStatus), and the rest.
        if std::path::Path::new("/proc/self/schedstat").exists() {
            let times = run["worker_time"].as_array().expect("worker_time");
            assert_eq!(times.len(), 2, "{run}");
            for t in times {
                assert!(t["workers"].as_u64().unwrap() >= 1, "{t}");
                let ms = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("{k} in {t}"));
                assert!(ms("on_cpu_ms_per_s") > 0.0, "{t}");
                assert!(
                    ms("asleep_ms_per_s") >= 0.0 && ms("waited_ms_per_s") >= 0.0,
                    "{t}"
                );
                let accounted =
                    ms("on_cpu_ms_per_s") + ms("waited_ms_per_s") + ms("asleep_ms_per_s");
                // The counts are read a few ms apart, in windows of a second or more.
                assert!(accounted <= 1100.0, "{t}");
                assert!(
                    (accounted + ms("stolen_ms_per_s") - 1000.0).abs() < 100.0,
                    "{t}"
                );
            }
        }
        // What the host took from the vCPUs over the run (Linux keeps it in /proc/stat).
        if cfg!(target_os = "linux") {
            let steal = &run["host_steal"];
            assert!(
                steal["steal_ms"].as_f64().expect("steal_ms") >= 0.0,
                "{run}"
            );
            let pct = steal["pct_of_vcpus"].as_f64().expect("pct_of_vcpus");
            assert!((0.0..=100.0).contains(&pct), "{run}");
        }
        // The executors' link over the run, from both ends: the sender dialed it and sent
        // the run's records in datagrams the receiver got.
        let links = run["data_plane"].as_array().expect("data_plane");
        let sent = links
            .iter()
            .find(|l| l["dialed"] == true)
            .unwrap_or_else(|| panic!("no dialing end in {run}"));
        let received = links
            .iter()
            .find(|l| l["dialed"] == false)
            .unwrap_or_else(|| panic!("no accepting end in {run}"));
        assert_ne!(sent["executor"], received["executor"], "{run}");
        let datagrams = sent["datagrams_sent"].as_u64().unwrap();
        assert!(datagrams > 0, "{run}");
        assert!(
            received["datagrams_received"].as_u64().unwrap() >= datagrams / 2,
            "{run}"
        );
        let flow = run["flow_id"].as_str().unwrap();
        for stream in 0..2 {
            let file = kept
                .join("sink")
                .join(flow)
                .join(format!("sink_{stream}.csv"));
            let len = std::fs::metadata(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
                .len();
            assert!(len > 0, "{} is empty", file.display());
        }
    }
    assert!(out_dir.path().join("latency.svg").exists());
    assert!(out.stdout.contains("rows/s"), "{out}");
    assert!(out.stdout.contains("engine workers switched out"), "{out}");
    assert!(out.stdout.contains("rows/dgram"), "{out}");
}

/// A run that outlasts `--run-timeout` is cancelled, and the next run starts only once its job
/// has ended; the sweep goes on and exits 3 (not every run verified).
#[test]
fn a_timed_out_run_is_cancelled_before_the_next_one_starts() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = cli_with_timeout(
        [
            "bench",
            "--rates",
            "200,0",
            "--ddl-freqs",
            "0",
            "--table-num",
            "2",
            "--binlog-num",
            "1",
            "--rcd-cnt",
            "2000",
            "--warmup-secs",
            "0",
            "--run-timeout",
            "4s",
            "--floor-secs",
            "0",
            "--idle-secs",
            "0",
            "--out",
            out_dir.path().to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert_eq!(out.status.and_then(|s| s.code()), Some(3), "{out}");
    assert!(
        out.stdout
            .contains("timed out after 4s; job 1 was cancelled and has ended"),
        "{out}"
    );
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.path().join("results.json")).unwrap(),
    )
    .unwrap();
    let states: Vec<&str> = results["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["TimedOut", "Finished"], "{results}");
}
