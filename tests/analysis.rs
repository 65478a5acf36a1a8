//! `fapool analyze` and `fapool check` on real runs of the quickstart job
//! (CPU backend, 4 ranks): plots, exports, the checker against corrupted
//! copies, the Python reader, run-to-run comparison and bad input.
//! Copies are corrupted with h5py; nothing here depends on timings.

mod common;
use common::*;
use fapool::results::read_run;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

/// A quickstart run with `sets`, written once per name into one scratch directory.
fn quickstart_run(name: &str, sets: &[&str]) -> PathBuf {
    let out = scratch(&format!("analysis-{name}")).join(format!("{name}.h5"));
    let job = repo_root().join("jobs/quickstart.toml");
    let mut args = vec!["run", job.to_str().unwrap(), "--backend", "cpu", "--out", out.to_str().unwrap()];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = mpirun(4, &args);
    assert!(o.status.success(), "{}", text(&o));
    out
}

/// The quickstart as shipped, run once for every test that only reads it.
fn quickstart() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| quickstart_run("quickstart", &[]))
}

/// A copy of the quickstart file to corrupt.
fn copy_of_quickstart(tag: &str) -> PathBuf {
    let copy = scratch(&format!("analysis-copy-{tag}")).join(format!("{tag}.h5"));
    std::fs::copy(quickstart(), &copy).unwrap();
    copy
}

/// Runs a Python snippet with h5py and numpy imported and `path` as `p`.
fn h5py(path: &Path, code: &str) {
    let program = format!("import h5py, numpy as np\np = {:?}\n{code}", path.to_str().unwrap());
    let o = command("/usr/bin/python3").args(["-c", &program]).output().expect("python3 runs");
    assert!(o.status.success(), "{}", text(&o));
}

fn analyze(args: &[&str]) -> Output {
    let mut all = vec!["analyze"];
    all.extend_from_slice(args);
    fapool(&all)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Width, height and luminance variance of a PNG.
fn png_stats(path: &Path) -> (u32, u32, f64) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let lum: Vec<f64> = buf[..info.buffer_size()].chunks(channels).map(|p| (p[0] as f64 + p[1 % channels] as f64 + p[2 % channels] as f64) / 3.0).collect();
    let mean = lum.iter().sum::<f64>() / lum.len() as f64;
    let var = lum.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / lum.len() as f64;
    (info.width, info.height, var)
}

const CHARTS: [&str; 8] = ["tpot_vs_length", "ttft_vs_length", "tps_vs_length", "improvement_vs_length", "comm_breakdown", "memory_by_role", "pool_size_vs_length", "pareto"];

#[test]
fn plots_of_the_quickstart_are_png_and_svg_of_the_expected_size_and_not_blank() {
    let dir = scratch("analysis-plots").join("plots");
    let o = analyze(&[s(quickstart()), "--plots", s(&dir)]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for chart in CHARTS {
        let (w, h, var) = png_stats(&dir.join(format!("{chart}.png")));
        assert_eq!((w, h), (1280, 800), "{chart}");
        // A white page with a title only varies far less than a chart.
        assert!(var > 300.0, "{chart}: luminance variance {var}");
        let svg = std::fs::read_to_string(dir.join(format!("{chart}.svg"))).unwrap();
        assert!(svg.starts_with(r#"<svg width="1280" height="800""#), "{chart}");
        assert!(svg.contains("job quickstart") && svg.contains("commit "), "{chart}: caption names the job and commit");
        assert!(svg.matches("<rect").count() + svg.matches("<polyline").count() + svg.matches("<circle").count() > 10, "{chart}");
    }
    // The CPU backend measures no energy; the run stored the planner's
    // predictions beside its measurements (the CPU model), so they are drawn.
    assert!(out.contains("plot energy_per_token_vs_length skipped:"), "{out}");
    assert!(!dir.join("energy_per_token_vs_length.png").exists());
    assert!(!out.contains("plot predicted_vs_measured skipped:"), "{out}");
    let (w, h, _) = png_stats(&dir.join("predicted_vs_measured.png"));
    assert_eq!((w, h), (1280, 800), "predicted_vs_measured");
}

/// Pixel width plotters lays `label` out in at the SVG's `font_size`
/// (plotters writes the size divided by 1.24), with the embedded font.
fn text_width(label: &str, svg_font_size: f32) -> f32 {
    use ab_glyph::{Font, FontRef, ScaleFont};
    let font = FontRef::try_from_slice(include_bytes!("../assets/fonts/DejaVuSans.ttf")).unwrap();
    let scaled = font.as_scaled(svg_font_size * 1.24);
    label.chars().map(|c| scaled.h_advance(scaled.glyph_id(c))).sum()
}

#[test]
fn a_40_character_strategy_name_is_not_cut_in_the_legend() {
    let name = "fapool-b2-p2-zigzag-overlap-mb2-long-nam";
    assert_eq!(name.len(), 40);
    let run = quickstart_run("long-name", &[&format!("strategy.1.name={name}"), "workload.sequences_per_category=4"]);
    let dir = run.parent().unwrap().join("plots");
    let o = analyze(&[s(&run), "--plots", s(&dir)]);
    assert!(o.status.success(), "{}", text(&o));
    let svg = std::fs::read_to_string(dir.join("tpot_vs_length.svg")).unwrap();
    let at = svg.find(&format!("\n{name}\n</text>")).expect("the whole name is a legend label");
    let tag = &svg[svg[..at].rfind("<text").unwrap()..at];
    let attr = |key: &str| -> f32 { tag.split(&format!(" {key}=\"")).nth(1).unwrap().split('"').next().unwrap().parse().unwrap() };
    let right = attr("x") + text_width(name, attr("font-size"));
    assert!(right <= 1280.0 - 4.0, "legend label ends at x = {right} on a 1280-pixel canvas");
    assert!(tag.contains("text-anchor=\"start\""), "{tag}");
}

/// The cells of one CSV line (quoted cells may hold commas; no line breaks in cells).
fn csv_cells(line: &str) -> Vec<String> {
    let (mut cells, mut cell, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cell.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => cells.push(std::mem::take(&mut cell)),
            c => cell.push(c),
        }
    }
    cells.push(cell);
    cells
}

fn csv_rows(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header = csv_cells(lines.next().unwrap());
    lines
        .map(|l| {
            let cells = csv_cells(l);
            assert_eq!(cells.len(), header.len(), "{l}");
            header.iter().cloned().zip(cells).collect()
        })
        .collect()
}

#[test]
fn csv_and_json_round_trip_to_the_hdf5_values() {
    let dir = scratch("analysis-export");
    let (csv_dir, json) = (dir.join("csv"), dir.join("run.json"));
    let o = analyze(&[s(quickstart()), "--csv", s(&csv_dir), "--json", s(&json)]);
    assert!(o.status.success(), "{}", text(&o));
    let run = read_run(quickstart()).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let (batches, summaries) = (csv_rows(&csv_dir.join("batches.csv")), csv_rows(&csv_dir.join("summary.csv")));
    let expected_batches: usize = run.strategies.iter().flat_map(|s| &s.categories).map(|c| c.batches.len()).sum();
    assert_eq!(batches.len(), expected_batches);
    assert_eq!(doc["batches"].as_array().unwrap().len(), expected_batches);
    let f = |row: &std::collections::HashMap<String, String>, k: &str| row[k].parse::<f64>().unwrap();
    for (row, j) in batches.iter().zip(doc["batches"].as_array().unwrap()) {
        let c = run.strategy(&row["strategy"]).unwrap().category(&row["category"]).unwrap();
        let b = c.batches.iter().find(|b| b.batch_index.to_string() == row["batch_index"]).unwrap();
        for (k, v) in [("ttft_s", b.ttft_s), ("e2e_s", b.e2e_s), ("tpot_s", b.tpot_s()), ("flops", b.flops)] {
            assert_eq!(f(row, k), v, "csv {k}");
            assert_eq!(j[k].as_f64().unwrap(), v, "json {k}");
        }
        assert_eq!(f(row, "seq_len") as u32, b.seq_len);
        assert_eq!(j["total_tokens"].as_u64().unwrap(), b.total_tokens());
        assert!(j["energy_j"].is_null() && row["energy_j"].is_empty(), "energy not measured is null, not zero");
    }
    assert_eq!(summaries.len(), 8);
    for (row, j) in summaries.iter().zip(doc["summary"].as_array().unwrap()) {
        let stored = run.strategy(&row["strategy"]).unwrap().category(&row["category"]).unwrap().summary.clone().unwrap();
        let m = &stored.summary;
        for (k, v) in [
            ("tps", m.tps),
            ("wall_s", m.wall_s),
            ("tpot_p50_s", m.tpot.p50),
            ("tpot_p99_s", m.tpot.p99),
            ("ttft_mean_s", m.ttft.mean),
            ("e2e_p90_s", m.e2e.p90),
            ("comm_share", stored.aggregates.comm_share()),
        ] {
            assert_eq!(f(row, k), v, "csv {k}");
            assert_eq!(j[k].as_f64().unwrap(), v, "json {k}");
        }
        assert!(f(row, "tpot_p50_ci_lo_s") <= m.tpot.p50 && m.tpot.p50 <= f(row, "tpot_p50_ci_hi_s"));
        assert_eq!(f(row, "tps_per_gpu"), m.tps / 4.0);
    }
}

fn check(path: &Path) -> (Option<i32>, String) {
    let o = fapool(&["check", s(path)]);
    (o.status.code(), text(&o))
}

#[test]
fn the_checker_passes_the_quickstart_file() {
    let (code, out) = check(quickstart());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok ("), "{out}");
}

#[test]
fn the_checker_names_a_missing_column() {
    let p = copy_of_quickstart("missing-column");
    h5py(&p, "f = h5py.File(p, 'r+')\ng = f['strategies/baseline-tp2-pp2/long']\nb = g['batches'][()]\nnames = [n for n in b.dtype.names if n != 'tpot_s']\ndel g['batches']\ng.create_dataset('batches', data=b[names], maxshape=(None,), chunks=True)\nf.close()");
    let (code, out) = check(&p);
    assert_eq!(code, Some(8), "{out}");
    assert!(out.contains("/strategies/baseline-tp2-pp2/long/batches: column `tpot_s` missing"), "{out}");
}

#[test]
fn the_checker_names_a_missing_provenance_attribute() {
    let p = copy_of_quickstart("missing-attr");
    h5py(&p, "f = h5py.File(p, 'r+')\ndel f['provenance'].attrs['mpi_library']\nf.close()");
    let (code, out) = check(&p);
    assert_eq!(code, Some(8), "{out}");
    assert!(out.contains("/provenance: attribute `mpi_library` missing"), "{out}");
}

#[test]
fn the_checker_names_an_inconsistent_tps() {
    let p = copy_of_quickstart("tps");
    h5py(&p, "f = h5py.File(p, 'r+')\nd = f['strategies/fapool-b2-p2-zigzag/medium/summary']\ns = d[()]\ns['tps'] *= 1.1\nd[...] = s\nf.close()");
    let (code, out) = check(&p);
    assert_eq!(code, Some(8), "{out}");
    assert!(out.contains("fapool-b2-p2-zigzag/medium: TPS") && out.contains("total_tokens / wall_s"), "{out}");
}

#[test]
fn the_checker_names_a_per_rank_total_that_does_not_add_up() {
    let p = copy_of_quickstart("rank-total");
    h5py(&p, "f = h5py.File(p, 'r+')\nd = f['strategies/fapool-b2-p2-zigzag/long/ranks']\nr = d[()]\nr['kv_replication_bytes'][0] += 4096\nr['flops'][0] *= 2\nd[...] = r\nf.close()");
    let (code, out) = check(&p);
    assert_eq!(code, Some(8), "{out}");
    assert!(out.contains("fapool-b2-p2-zigzag/long: comm kv_replication: summary"), "{out}");
    assert!(out.contains("rank flops add up to"), "{out}");
}

#[test]
fn the_checker_names_tokens_that_differ_between_strategies() {
    let p = copy_of_quickstart("tokens");
    h5py(&p, "f = h5py.File(p, 'r+')\nd = f['strategies/fapool-b2-p2-zigzag/short/tokens']\nt = d[()]\nt[0, 3] += 1\nd[...] = t\nf.close()");
    let (code, out) = check(&p);
    assert_eq!(code, Some(8), "{out}");
    assert!(out.contains("short batch") && out.contains("tokens of fapool-b2-p2-zigzag differ from baseline-tp2-pp2") && out.contains("output token 3"), "{out}");
}

#[test]
fn the_python_script_prints_the_summary_table_analyze_prints() {
    let script = repo_root().join("scripts/results_summary.py");
    let py = command("/usr/bin/python3").args([s(&script), s(quickstart())]).output().expect("python3 runs");
    assert!(py.status.success(), "{}", text(&py));
    let a = analyze(&[s(quickstart())]);
    let table: String = String::from_utf8_lossy(&a.stdout).split("\nsummary\n").nth(1).unwrap().split("\n\n").next().unwrap().to_string();
    assert_eq!(String::from_utf8_lossy(&py.stdout), format!("summary\n{table}\n"));
    assert_eq!(table.lines().count(), 2 + 8);
}

#[test]
fn comparing_a_file_with_itself_shows_no_significant_change() {
    let o = analyze(&["--compare", s(quickstart()), s(quickstart())]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(!out.lines().any(|l| l.ends_with("CHANGED")), "{out}");
    assert!(out.contains("0 of 40 changes larger than the noise"), "{out}");
}

#[test]
fn a_copy_with_one_strategys_tpot_scaled_by_1_5_is_flagged() {
    let p = copy_of_quickstart("slower");
    h5py(
        &p,
        "f = h5py.File(p, 'r+')\nfor g in f['strategies/fapool-b2-p2-zigzag'].values():\n    b = g['batches'][()]\n    b['e2e_s'] = b['ttft_s'] + 1.5 * (b['e2e_s'] - b['ttft_s'])\n    b['tpot_s'] *= 1.5\n    g['batches'][...] = b\n    g['itl_s'][...] = g['itl_s'][()] * 1.5\nf.close()",
    );
    let o = analyze(&["--compare", s(quickstart()), s(&p)]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let tpot: Vec<&str> = out.lines().filter(|l| l.contains("TPOT p50")).collect();
    assert_eq!(tpot.len(), 8, "{out}");
    for line in tpot {
        let slowed = line.starts_with("fapool-b2-p2-zigzag");
        assert_eq!(line.ends_with("CHANGED"), slowed, "{line}");
        if slowed {
            assert!(line.contains("+50.0"), "{line}");
        }
    }
}

#[test]
fn runs_of_different_models_are_refused_unless_forced() {
    let other = quickstart_run("four-layers", &["model.layers=4", "workload.sequences_per_category=4"]);
    let o = analyze(&["--compare", s(quickstart()), s(&other)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("different models") && text(&o).contains("--force"), "{}", text(&o));
    let forced = analyze(&["--compare", s(quickstart()), s(&other), "--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
}

#[test]
fn the_busy_idle_plot_is_drawn_when_the_rank_rows_record_it() {
    // Schema 2 rank rows record compute and waiting time.
    let p = copy_of_quickstart("busy");
    let dir = p.parent().unwrap().join("plots");
    let o = analyze(&[s(&p), "--plots", s(&dir)]);
    assert!(o.status.success(), "{}", text(&o));
    let (w, h, var) = png_stats(&dir.join("busy_idle_by_rank.png"));
    assert_eq!((w, h), (1280, 800));
    assert!(var > 300.0, "variance {var}");
    assert!(std::fs::read_to_string(dir.join("busy_idle_by_rank.svg")).unwrap().contains("rank 3"));
}

#[test]
fn bad_input_is_a_clear_error_with_exit_code_2() {
    let dir = scratch("analysis-bad");
    let not_hdf5 = dir.join("notes.h5");
    std::fs::write(&not_hdf5, "not an HDF5 file\n").unwrap();
    let truncated = dir.join("truncated.h5");
    let bytes = std::fs::read(quickstart()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let other_schema = copy_of_quickstart("schema");
    h5py(&other_schema, "f = h5py.File(p, 'r+')\nf.attrs['schema_version'] = np.uint32(99)\nf.close()");
    for (file, says) in [(&not_hdf5, "cannot open"), (&truncated, "cannot open"), (&other_schema, "schema version 99")] {
        for cmd in [vec!["analyze", s(file)], vec!["check", s(file)]] {
            let o = fapool(&cmd);
            assert_eq!(o.status.code(), Some(2), "{cmd:?}: {}", text(&o));
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains(s(file)) && err.contains(says), "{cmd:?}: {err}");
        }
    }
}
