//! Golden-file tests of the cost report's table, Markdown and JSON output, and of the CLI's
//! located errors. Re-bless after an intended change with `BLESS=1 cargo test --test report_golden`.

use cnnc_compiler::cost::{analyze, render, render_compare, Format};
use cnnc_compiler::lang;
use std::path::Path;

fn check_golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with BLESS=1 to create it)", path.display()));
    if expected != actual {
        let first = expected.lines().zip(actual.lines()).position(|(a, b)| a != b);
        panic!(
            "{} differs from the golden file (first differing line {:?}); re-bless with BLESS=1 if intended\n--- actual ---\n{actual}",
            path.display(),
            first.map(|i| i + 1)
        );
    }
}

fn model(file: &str) -> cnnc_compiler::ir::Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models").join(file);
    let program = lang::load_file(&path).unwrap_or_else(|d| panic!("{}", d.render_file(&path)));
    let name = program.models().last().expect("a model").name.clone();
    program.expand(&name).unwrap_or_else(|d| panic!("{}", d.render_file(&path)))
}

#[test]
fn lenet5_table_and_json() {
    let r = analyze(&model("lenet5.cnn"), 1);
    check_golden("lenet5.table.txt", &render(&r, Format::Table));
    let json = render(&r, Format::Json);
    check_golden("lenet5.json", &json);
    // The documented fields exist with the documented meaning.
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["model"], "LeNet5");
    assert_eq!(v["params"], 44_426);
    assert_eq!(v["macs"], 86_400 + 153_600 + 30_720 + 10_080 + 840);
    assert_eq!(v["input"][0], serde_json::json!([1, 28, 28]));
    assert_eq!(v["output"][0], serde_json::json!([10]));
    assert!(v["flops"]["forward"].as_u64().unwrap() > 2 * v["macs"].as_u64().unwrap());
    assert_eq!(v["layers"][1]["name"], "conv1");
    assert_eq!(v["layers"][1]["receptive_field"], serde_json::json!([5, 5]));
}

#[test]
fn inception_markdown_and_compare() {
    let naive = analyze(&model("inception_naive.cnn"), 1);
    let reduced = analyze(&model("inception_reduced.cnn"), 1);
    assert_eq!(naive.totals.macs, 854_196_224);
    assert_eq!(reduced.totals.macs, 271_351_808);
    check_golden("inception_reduced.md", &render(&reduced, Format::Markdown));
    let cmp = render_compare(&naive, &reduced, false);
    assert!(cmp.contains("854,196,224") && cmp.contains("271,351,808") && cmp.contains("0.318x"), "{cmp}");
    check_golden("inception_compare.txt", &cmp);
}

#[test]
fn cli_shape_error_is_located() {
    let dir = std::env::temp_dir().join(format!("cnnc-golden-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.cnn");
    std::fs::write(&file, "model Bad(input: 1x12x12) {\n    conv1: conv(6, 5x5);\n    pool1: maxpool(2x2);\n    conv2: conv(16, 5x5);\n}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnnc")).arg("report").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("needs at least 5x5 input, got 4x4 at `pool1`"), "{err}");
    assert!(err.contains("bad.cnn:4:12"), "{err}");
    assert!(err.contains("^^^"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
