//! End to end through the public API only: a TOML spec names the output directory, a
//! hand-written "pipeline" writes sink files with [`SinkRow::write_to`] at
//! [`DemoSpec::sink_path`], and [`verify`] judges them. Proves the three modules agree on
//! paths, format and expectations.

use std::fs;

use microcosm_demo::{DemoSpec, RowKind, SinkRow, Violation, verify};

/// Writes what a correct run of `spec` produces; `skip` drops one data row `(table, pk)`.
fn write_run(spec: &DemoSpec, skip: Option<(u32, u64)>) {
    fs::create_dir_all(spec.output_dir()).expect("create the output dir");
    let streams = spec.binlog_num as usize;
    let mut files = vec![Vec::new(); streams];
    let mut clock = 1_000_000_000u64;
    let mut row = |kind, table_id, schema_ver, pk| {
        clock += 10;
        SinkRow {
            kind,
            table_id,
            schema_ver,
            pk,
            produced_ns: clock,
            synced_ns: clock + 3,
            sink_ns: clock + 7,
        }
    };
    for table in 0..spec.table_num {
        let ddls: Vec<_> = spec.expected_ddls(table).collect();
        for pk in 1..=spec.rcd_cnt {
            if let Some(ddl) = ddls.iter().find(|d| d.pk == pk) {
                for file in &mut files {
                    row(RowKind::Ddl, table, ddl.version, pk).write_to(file);
                }
            }
            let data = row(RowKind::Data, table, spec.version_of(pk), pk);
            if skip != Some((table, pk)) {
                data.write_to(&mut files[(pk % streams as u64) as usize]);
            }
        }
    }
    for (i, bytes) in files.iter().enumerate() {
        fs::write(spec.sink_path(i as u32), bytes).expect("write a sink file");
    }
}

fn spec_in(dir: &std::path::Path) -> DemoSpec {
    let text = format!(
        "flow-id = \"it-1\"\ntable-num = 4\nbinlog-num = 3\nrcd-cnt = 500\nddl-freq = 50\n\
         sink-dir = {:?}\n",
        dir.to_str().expect("temp dir paths are UTF-8")
    );
    DemoSpec::from_toml_str(&text).expect("the test spec is valid")
}

#[test]
fn correct_run_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_in(tmp.path());
    write_run(&spec, None);
    let report = verify(&spec.output_dir(), &spec).unwrap();
    assert!(report.passed(), "{report}");
    assert_eq!(report.data_rows, spec.total_data_records());
    assert_eq!(report.ddl_rows, spec.ddl_rows_per_stream() * 3);
}

#[test]
fn lost_row_fails_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_in(tmp.path());
    write_run(&spec, Some((3, 250)));
    let report = verify(&spec.output_dir(), &spec).unwrap();
    assert!(!report.passed());
    assert_eq!(
        report.violations,
        vec![Violation::MissingData { table: 3, pk: 250 }]
    );
}
