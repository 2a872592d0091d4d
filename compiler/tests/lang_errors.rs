//! Diagnostics of the model language: each error kind's message and the `line:col` it points
//! at, errors collected together, and the rustc-style rendering of a bad `.cnn` file.

use cnnc_compiler::lang::{self, Diagnostic, Diagnostics};

/// Parse-and-check errors of `text`.
fn check_errors(text: &str) -> Vec<Diagnostic> {
    match lang::parse_source("t.cnn", text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(d) => {
            eprintln!("{}", d.render("t.cnn", text));
            d.0
        }
    }
}

/// The single expansion error of model `model`.
fn expand_error(text: &str, model: &str) -> Diagnostic {
    let p = lang::parse_source("t.cnn", text).unwrap_or_else(|d| panic!("{}", d.render("t.cnn", text)));
    match p.expand(model) {
        Ok(g) => panic!("expected an expansion error, got\n{g}"),
        Err(d) => {
            eprintln!("{}", d.render("t.cnn", text));
            assert_eq!(d.len(), 1);
            d.0.into_iter().next().unwrap()
        }
    }
}

/// Assert one diagnostic's message, location and help.
fn is(d: &Diagnostic, message: &str, line_col: (usize, usize), help: Option<&str>) {
    assert_eq!(d.message, message);
    assert_eq!(d.line_col(), Some(line_col), "location of `{message}`");
    if let Some(h) = help {
        assert_eq!(d.help.as_deref(), Some(h), "help of `{message}`");
    }
}

fn only(text: &str) -> Diagnostic {
    let mut e = check_errors(text);
    assert_eq!(e.len(), 1, "{e:#?}");
    e.pop().unwrap()
}

#[test]
fn lexing_error_is_located() {
    let d = only("model M(input: 1x8x8) {\n    relu;\n    conv(4, 3x3));\n}\n");
    is(&d, "unmatched closing `)`", (3, 17), None);
    let d = only("model M(input: 1x8x8) {\n    relu;\n    conv(4, 3x3;\n}\n");
    is(&d, "unclosed `(`", (3, 9), None);
    assert_eq!(d.label.as_deref(), Some("this `(` is closed by the `}` at 4:1"));
    let d = only("model M(input: 1x8x8) { // a ( in a comment\n    relu; /* and ) here */\n    conv(4, 3x3);\n");
    is(&d, "unclosed `{`", (1, 23), None);
    let d = only("model M(input: 1x8x8) {\n    relu; €\n}\n");
    is(&d, "unexpected character `€`", (2, 11), None);
    let d = only("model M(input: 1x8x8) {\n    relu; \"oops;\n}\n");
    is(&d, "unterminated string", (2, 11), None);
}

#[test]
fn missing_semicolon() {
    let d = only("model M(input: 1x8x8) {\n    conv(4, 3x3) relu;\n}\n");
    is(&d, "expected `;` after `conv`", (2, 5), None);
}

#[test]
fn unknown_layer_suggests_a_block() {
    let d = only(
        "block inception(c) { conv(c, 1x1); }\nmodel M(input: 8x8x8) {\n    conv(4, 3x3);\n    incepton(4);\n}\n",
    );
    is(&d, "unknown layer or block `incepton`", (4, 5), Some("did you mean `inception`?"));
}

#[test]
fn unknown_keyword_suggests_the_closest() {
    let d = only("model M(input: 1x8x8) {\n    conv(4, 3x3, strid=2);\n}\n");
    is(&d, "layer `conv` has no argument `strid`", (2, 18), Some("did you mean `stride`?"));
}

#[test]
fn missing_and_extra_positional_arguments() {
    let e = check_errors("model M(input: 1x8x8) {\n    conv(4);\n    flatten;\n    dense(10, 20);\n}\n");
    assert_eq!(e.len(), 2);
    is(&e[0], "layer `conv` is missing its argument `kernel`", (2, 5), Some("usage: conv(out, kernel, key = value...)"));
    is(&e[1], "layer `dense` takes 1 positional argument, got 2", (4, 15), None);
}

#[test]
fn wrong_argument_type_with_swap_hint() {
    let d = only("model M(input: 3x8x8) {\n    conv(3x3, 64);\n}\n");
    is(
        &d,
        "`out` of `conv` must be a positive integer, got `3x3`",
        (2, 10),
        Some("the output channel count comes first: `conv(out, kernel)`, e.g. `conv(64, 3x3)`"),
    );
    let d = only("model M(input: 3x8x8) {\n    conv(8, 3x3, pad=true);\n}\n");
    assert!(d.message.starts_with("`pad` of `conv` must be a padding"), "{}", d.message);
    assert_eq!(d.line_col(), Some((2, 18)));
}

#[test]
fn undefined_parameter() {
    let d = only("block b(channels) {\n    conv(chanels, 3x3);\n}\nmodel M(input: 3x8x8) { b(4); }\n");
    is(&d, "undefined parameter `chanels`", (2, 10), Some("did you mean `channels`?"));
    let d = only("block b(k) {\n    conv(4, kxk);\n}\nmodel M(input: 3x8x8) { b(3); }\n");
    is(&d, "undefined parameter `kxk`", (2, 13), Some("to build a size from parameters, put spaces around `x`: `k x k`"));
}

#[test]
fn duplicate_layer_names() {
    let d = only("model M(input: 3x8x8) {\n    a: conv(4, 1x1);\n    relu;\n    a: conv(4, 1x1);\n}\n");
    is(&d, "duplicate layer name `a`", (4, 5), None);
    assert_eq!(d.notes, ["first used at 2:5"]);
    // the arms of one `if` may reuse a name
    lang::parse_source("t", "model M(input: 3x8x8, f = true) { if f { a: relu; } else { a: tanh; } }").unwrap();
}

#[test]
fn recursive_blocks() {
    let d = only("block a(c) { b(c); }\nblock b(c) {\n    relu;\n    a(c);\n}\nmodel M(input: 3x8x8) { a(1); }\n");
    is(&d, "block `a` is recursive: a -> b -> a", (4, 5), None);
}

#[test]
fn bad_size_literals() {
    let e = check_errors("model M(input: 3x8x8) {\n    conv(4, 3x3y);\n    conv(4, 0x3);\n    conv(4, 3x0);\n}\n");
    assert_eq!(e.len(), 3);
    is(&e[0], "bad size literal `3x3y`: expected dimensions joined by `x`, like `3x3`, `1x7` or `3x224x224`", (2, 13), None);
    assert!(e[1].message.starts_with("bad size literal `0x3`"), "{}", e[1].message);
    is(&e[2], "bad size literal `3x0`: every dimension must be at least 1", (4, 13), None);
}

#[test]
fn inexact_division_constant_and_from_parameters() {
    let d = only("model M(input: 3x8x8) {\n    conv(4, 3x3);\n    conv(10 / 4, 1x1);\n}\n");
    is(&d, "10 / 4 is not exact (remainder 2)", (3, 10), Some("choose values so that 4 divides 10"));
    let d = expand_error(
        "block se(c, r = 16) {\n    scale { gap; dense(c / r); relu; dense(c); sigmoid; }\n}\nmodel M(input: 24x8x8) {\n    se(24);\n}\n",
        "M",
    );
    is(&d, "24 / 16 is not exact (remainder 8)", (2, 24), None);
    assert_eq!(d.notes, ["in `se1`, an instance of block `se` (called at 5:5)"]);
}

#[test]
fn kernel_larger_than_its_input_names_the_previous_layer() {
    let text = "model M(input: 1x16x16) {\n    conv1: conv(6, 5x5); relu;\n    pool1: maxpool(2x2);\n    pool2: maxpool(2x2);\n    conv3: conv(16, 5x5);\n}\n";
    let d = expand_error(text, "M");
    is(
        &d,
        "conv 5x5 (no padding) needs at least 5x5 input, got 3x3 at `pool2`",
        (5, 12),
        Some("use a kernel of at most 3x3, or pad=1"),
    );
    assert_eq!(d.label.as_deref(), Some("input is 6x3x3 (output of `pool2`)"));
}

#[test]
fn residual_mismatch_suggests_a_projection() {
    let text = "model M(input: 64x28x28) {\n    residual {\n        conv(128, 3x3, pad=1);\n    }\n}\n";
    let d = expand_error(text, "M");
    is(
        &d,
        "residual add: main path is 128x28x28 but the identity shortcut is 64x28x28 — add a 1x1 projection (conv(128, 1x1)) to the shortcut",
        (2, 5),
        Some("write `shortcut(auto) { conv(128, 1x1); bn; }` after the main path to project only where the shapes differ"),
    );
    let text = "model M(input: 64x56x56) {\n    residual { conv(128, 3x3, stride=2, pad=1); } shortcut { conv(64, 1x1, stride=2); }\n}\n";
    let d = expand_error(text, "M");
    is(
        &d,
        "residual add: main path is 128x28x28 but the shortcut is 64x28x28 — add a 1x1 projection (conv(128, 1x1)) to the shortcut",
        (2, 5),
        None,
    );
}

#[test]
fn dense_on_an_image_asks_for_flatten() {
    let d = expand_error("model M(input: 16x4x4) {\n    relu;\n    dense(10);\n}\n", "M");
    is(&d, "dense on a 16x4x4 input is ambiguous (which axis is the feature axis?)", (3, 5), Some("insert `flatten` before it (flatten gives 256)"));
    assert_eq!(d.label.as_deref(), Some("input is 16x4x4 (output of `relu1`)"));
}

#[test]
fn concat_branches_of_different_sizes() {
    let d = expand_error("model M(input: 8x8x8) {\n    concat {\n        { conv(4, 1x1); }\n        { maxpool(2x2); }\n    }\n}\n", "M");
    is(&d, "concat needs equal spatial sizes: branch 1 is 4x8x8 but branch 2 is 8x4x4", (2, 5), Some("give every branch the same stride and `same` padding"));
}

#[test]
fn scale_branch_of_the_wrong_width() {
    let d = expand_error("model M(input: 8x8x8) {\n    scale { gap; flatten; dense(4); sigmoid; }\n}\n", "M");
    assert_eq!(d.line_col(), Some((2, 5)));
    assert!(d.message.starts_with("scale: multiplying 8x8x8 needs a branch ending in 8 (or 8x1x1) values, got 4"), "{}", d.message);
}

#[test]
fn structural_errors() {
    let text = "model Net(input: 3x8x8) { relu; }\nmodel Net(input: 3x8x8) { relu; }\nblock relu(c) { tanh; }\nmodel M(input: 3x8x8) {\n    Net;\n    concat { { relu; } }\n    if 3 { relu; }\n    conv(stride=2, 8, 3x3);\n}\n";
    let e = check_errors(text);
    let got: Vec<(String, Option<(usize, usize)>)> = e.iter().map(|d| (d.message.clone(), d.line_col())).collect();
    let want = [
        ("`Net` is defined twice", (2, 7)),
        ("block name `relu` is a built-in layer", (3, 7)),
        ("`Net` is a model, not a block", (5, 5)),
        ("`concat` needs at least two branches, got 1", (6, 5)),
        ("an `if` condition must be `true`/`false`, got `3`", (7, 8)),
        ("positional argument after a keyword argument", (8, 20)),
        ("positional argument after a keyword argument", (8, 23)),
    ];
    let want: Vec<(String, Option<(usize, usize)>)> = want.iter().map(|(m, l)| (m.to_string(), Some(*l))).collect();
    assert_eq!(got, want);
}

#[test]
fn block_argument_errors() {
    let e = check_errors("block b(c, k = 3) { conv(c, k); }\nmodel M(input: 3x8x8) {\n    b(k = 1);\n    b(1, 2, 3);\n    b(1, kk = 3);\n}\n");
    let msgs: Vec<&str> = e.iter().map(|d| d.message.as_str()).collect();
    // (an `if` on a parameter is checked when the model is expanded)
    assert_eq!(msgs, ["block `b` is missing its argument `c`", "block `b` takes 2 positional arguments, got 3", "block `b` has no argument `kk`"]);
    assert_eq!(e[2].help.as_deref(), Some("did you mean `k`?"));
}

#[test]
fn unknown_model_in_expand() {
    let p = lang::parse_source("t", "model LeNet5(input: 1x28x28) { relu; }").unwrap();
    let e = p.expand("LeNet").unwrap_err();
    assert_eq!(e.0[0].message, "no model named `LeNet`");
    assert_eq!(e.0[0].help.as_deref(), Some("did you mean `LeNet5`?"));
}

#[test]
fn independent_errors_are_reported_together_and_combine_for_the_macro() {
    let text = "model M(input: 3x8x8) {\n    conv(4, 3x3, strid=1);\n    relux;\n    dense(x);\n}\n";
    let e = lang::parse_source("t.cnn", text).unwrap_err();
    assert_eq!(e.len(), 3);
    let lines: Vec<usize> = e.iter().map(|d| d.line_col().unwrap().0).collect();
    assert_eq!(lines, [2, 3, 4]);
    assert_eq!(e.0[1].help.as_deref(), Some("did you mean `relu`?"));
    let syn_err = e.to_syn_error();
    assert_eq!(syn_err.into_iter().count(), 3);
    let shown = e.to_string();
    assert!(shown.starts_with("2:18: layer `conv` has no argument `strid`"), "{shown}");
}

#[test]
fn rendered_like_rustc() {
    let text = "\
/// A broken LeNet.
model Bad(input: 1x16x16) {
    conv1: conv(6, 5x5); relu;
    pool1: maxpool(2x2);
    pool2: maxpool(2x2);
    conv3: conv(16, 5x5);
}
";
    let p = lang::parse_source("examples/models/bad.cnn", text).unwrap();
    let e: Diagnostics = p.expand("Bad").unwrap_err();
    let want = "\
error: conv 5x5 (no padding) needs at least 5x5 input, got 3x3 at `pool2`
 --> examples/models/bad.cnn:6:12
  |
6 |     conv3: conv(16, 5x5);
  |            ^^^^^^^^^^^^^ input is 6x3x3 (output of `pool2`)
  = help: use a kernel of at most 3x3, or pad=1
";
    assert_eq!(e.render("examples/models/bad.cnn", text), want);

    let text = "model M(input: 3x8x8) {\n    conv(4, 3x3, strid=1);\n    relux;\n}\n";
    let e = lang::parse_source("m.cnn", text).unwrap_err();
    let want = "\
error: layer `conv` has no argument `strid`
 --> m.cnn:2:18
  |
2 |     conv(4, 3x3, strid=1);
  |                  ^^^^^ unknown argument
  = help: did you mean `stride`?

error: unknown layer or block `relux`
 --> m.cnn:3:5
  |
3 |     relux;
  |     ^^^^^ not a built-in layer or a block of this program
  = help: did you mean `relu`?

error: aborting due to 2 previous errors
";
    assert_eq!(e.render("m.cnn", text), want);
}

#[test]
fn dynamic_condition_and_repetition_errors() {
    let d = expand_error("model M(input: 3x8x8, on = 3) {\n    relu;\n    if on { relu; }\n}\n", "M");
    is(&d, "an `if` condition must be `true`/`false`, got `3`", (3, 8), None);
    let d = expand_error("block b(n) {\n    n x relu;\n}\nmodel M(input: 3x8x8) {\n    b(0 - 2);\n}\n", "M");
    is(&d, "a repetition count must be a non-negative integer, got `-2`", (2, 5), None);
    let d = expand_error("block b(k) {\n    conv(4, k);\n}\nmodel M(input: 3x8x8) {\n    b(true);\n}\n", "M");
    is(&d, "`kernel` of `conv` must be a size: `KxK` (like `3x3` or `1x7`), an integer `k` for `kxk`, or `(h, w)`, got `true`", (2, 13), None);
}
