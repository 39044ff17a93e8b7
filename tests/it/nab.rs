//! benches/nab.sh on a folder shaped like NAB's, made here: it must run on any such folder
//! (data/<category>/<name>.csv and labels/combined_windows.json), write one score a row in
//! input order, skip unlabelled files, and catch the anomaly the data holds. The real NAB
//! figures come from the benchmark itself (docs/anomaly-detection.md).

use std::process::Command;

use crate::util::*;

#[test]
fn nab_script_scores_every_labelled_file_row_for_row() {
    let dir = tempfile::tempdir().unwrap();
    let nab = dir.path().join("nab");
    let results = dir.path().join("results");
    std::fs::create_dir_all(nab.join("data/plant")).unwrap();
    std::fs::create_dir_all(nab.join("data/other")).unwrap();
    std::fs::create_dir_all(nab.join("labels")).unwrap();
    // A pump's hourly vibration: a steady pattern, then a jump far outside its range at
    // row 600. The second file has no trailing newline; the third is not labelled.
    let ts = |i: usize| format!("2020-01-{:02} {:02}:00:00", 1 + i / 24, i % 24);
    let mut pump = String::from("timestamp,value\n");
    for i in 0..700 {
        let v = 5.0 + ((i % 12) as f64) * 0.1 + if i == 600 { 20.0 } else { 0.0 };
        pump.push_str(&format!("{},{v}\n", ts(i)));
    }
    std::fs::write(nab.join("data/plant/pump.csv"), &pump).unwrap();
    let mut room = String::from("timestamp,value");
    for i in 0..400 {
        room.push_str(&format!("\n{},{}", ts(i), 20 + i % 3));
    }
    std::fs::write(nab.join("data/other/room.csv"), &room).unwrap();
    std::fs::write(nab.join("data/other/unlabelled.csv"), "timestamp,value\n").unwrap();
    std::fs::write(
        nab.join("labels/combined_windows.json"),
        format!(
            r#"{{"plant/pump.csv": [["{}.000000", "{}.000000"]], "other/room.csv": []}}"#,
            ts(595),
            ts(610)
        ),
    )
    .unwrap();

    let out = Command::new("bash")
        .arg(repo().join("benches/nab.sh"))
        .arg(&nab)
        .arg(&results)
        .env("FLEETSQL_BIN", BIN)
        .env("NAB_THROUGHPUT", "3000")
        .env("NAB_SCORE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nab.sh failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("scored 2 files"), "{stdout}");
    assert!(stdout.contains("throughput: replayed"), "{stdout}");
    assert!(!results.join("other/unlabelled.csv").exists());

    for (name, input) in [("plant/pump.csv", &pump), ("other/room.csv", &room)] {
        let text = std::fs::read_to_string(results.join(name)).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("timestamp,anomaly_score"), "{name}");
        let rows: Vec<(String, f64)> = lines
            .map(|l| {
                let (t, s) = l.split_once(',').unwrap();
                (t.to_string(), s.parse().unwrap())
            })
            .collect();
        let times: Vec<&str> = input
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap())
            .collect();
        assert_eq!(rows.len(), times.len(), "{name}: one score a row");
        for (r, t) in rows.iter().zip(&times) {
            assert_eq!(r.0, *t, "{name}: rows in input order");
            assert!(
                (0.0..=1.0).contains(&r.1),
                "{name}: score {} out of [0, 1]",
                r.1
            );
        }
        if name == "plant/pump.csv" {
            assert!(rows[..300].iter().all(|r| r.1 == 0.0), "warm-up scores 0");
            assert!(rows[600].1 >= 0.4, "the jump is an alarm: {}", rows[600].1);
            let alarms = rows.iter().filter(|r| r.1 >= 0.4).count();
            assert!(
                alarms <= 3,
                "{alarms} alarms on a steady pattern with one jump"
            );
        }
    }
}
