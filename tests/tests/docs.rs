//! The README and docs name only commands that exist: every `cargo xtask X` and `sluice-lab X`
//! they write is a subcommand in that program's own help text (`help`), and every subcommand
//! of either is written somewhere in them. Runs the real programs; needs no root.

use std::{collections::BTreeSet, path::Path, process::Command};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// README.md and every page under docs/.
fn docs() -> Vec<(String, String)> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("a readable page");
            (p.display().to_string(), text)
        })
        .collect()
}

/// The subcommands a clap help text lists under `Commands:` (without clap's own `help`).
fn subcommands(help: &str) -> BTreeSet<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

fn help(command: &mut Command) -> String {
    let out = command.arg("help").output().expect("runs");
    assert!(out.status.success(), "{command:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

/// What follows `program` in command position in `text` (`program X`, `$(program X`,
/// `target/debug/program X|Y|Z`): each alternative, as a bare word.
fn named_after(text: &str, program: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| {
            let prefix = w[0].strip_suffix(program);
            prefix.is_some_and(|p| p.is_empty() || p.ends_with(['`', '(', '/']))
        })
        .flat_map(|w| w[1].split('|'))
        .map(|word| word.trim_matches(|c: char| !c.is_ascii_lowercase() && c != '-'))
        .filter(|word| {
            word.chars().next().is_some_and(|c| c.is_ascii_lowercase()) && !word.starts_with("--")
        })
        .map(str::to_string)
        .collect()
}

fn check(program: &str, named_by: &str, commands: &BTreeSet<String>) {
    let pages = docs();
    let mut mentioned = BTreeSet::new();
    for (page, text) in &pages {
        for word in named_after(text, named_by) {
            assert!(
                commands.contains(&word),
                "{page} names `{named_by} {word}`, which {program} does not have ({commands:?})"
            );
            mentioned.insert(word);
        }
    }
    let unmentioned: Vec<_> = commands.difference(&mentioned).collect();
    assert!(
        unmentioned.is_empty(),
        "{program}'s {unmentioned:?} is in no page of README.md or docs/"
    );
}

#[test]
fn every_xtask_command_the_docs_name_exists_and_each_is_documented() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut xtask = Command::new(cargo);
    xtask
        .current_dir(root())
        .args(["run", "-q", "-p", "xtask", "--"]);
    let commands = subcommands(&help(&mut xtask));
    assert!(
        commands.contains("setup") && commands.contains("lab"),
        "{commands:?}"
    );
    check("cargo xtask", "xtask", &commands);
}

#[test]
fn every_sluice_lab_command_the_docs_name_exists_and_each_is_documented() {
    let commands = subcommands(&help(&mut Command::new(env!("CARGO_BIN_EXE_sluice-lab"))));
    assert!(
        commands.contains("demo") && commands.contains("matrix"),
        "{commands:?}"
    );
    check("sluice-lab", "sluice-lab", &commands);
}

#[test]
fn command_words_are_read_as_a_reader_reads_them() {
    let text = "run `cargo xtask setup && cargo xtask lab`; then `target/debug/sluice-lab\n\
                matrix|up|down`, `kubectl --kubeconfig $(sluice-lab kubeconfig)`; \
                `sluice-lab` itself, sluice-lab's flags, `sluice-lab --help`";
    assert_eq!(named_after(text, "xtask"), ["setup", "lab"]);
    assert_eq!(
        named_after(text, "sluice-lab"),
        ["matrix", "up", "down", "kubeconfig"]
    );
}
