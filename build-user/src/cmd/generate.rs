//! `buildcage generate man DIR` and `buildcage generate completions SHELL DIR`:
//! the man pages and shell completions that packages install, made from the
//! clap definitions so that they say what `--help` says. Hidden: `cargo xtask
//! dist` and `cargo xtask install` run it on the binary they package.

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use buildcage::hint::Hinted;
use clap_mangen::{
    Man,
    roff::{Roff, bold, roman},
};

#[derive(Debug, clap::Args)]
pub(crate) struct GenerateArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// One man page per command into DIR: buildcage.1, buildcage-run.1,
    /// buildcage-policy-check.1, ...
    Man { dir: PathBuf },
    /// SHELL's completion script into DIR, under clap_complete's name for it
    /// (buildcage.bash, _buildcage, buildcage.fish)
    Completions {
        shell: clap_complete::Shell,
        dir: PathBuf,
    },
}

/// `exit_status` as the text that ends `buildcage --help`.
pub(crate) fn exit_status_help(exit_status: &[(&str, &str)]) -> String {
    let width = exit_status
        .iter()
        .map(|(code, _)| code.len())
        .max()
        .unwrap_or(0);
    let mut text = String::from("Exit status:");
    for (code, meaning) in exit_status {
        let _ = write!(text, "\n  {code:<width$}  {meaning}");
    }
    text
}

pub(crate) fn exec(
    args: &GenerateArgs,
    cli: clap::Command,
    exit_status: &[(&str, &str)],
) -> anyhow::Result<ExitCode> {
    let dir = match &args.what {
        What::Man { dir } | What::Completions { dir, .. } => dir,
    };
    let io = |e: std::io::Error| {
        Hinted::new(
            format!("cannot write to {}", dir.display()),
            "give a directory that exists and is writable",
        )
        .because(e)
    };
    let mut cli = visible(cli);
    match &args.what {
        What::Man { .. } => man_pages(cli, exit_status, dir).map_err(io)?,
        What::Completions { shell, .. } => {
            clap_complete::generate_to(*shell, &mut cli, "buildcage", dir).map_err(io)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cli` without its hidden subcommands (this one): clap_mangen leaves them
/// out by itself, but clap_complete would offer them.
fn visible(cli: clap::Command) -> clap::Command {
    let hidden: Vec<String> = cli
        .get_subcommands()
        .filter(|sub| sub.is_hide_set())
        .map(|sub| sub.get_name().to_owned())
        .collect();
    if hidden.is_empty() {
        return cli;
    }
    // clap cannot remove a subcommand: rebuild the top level from the others.
    let shown: Vec<clap::Command> = cli
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set())
        .cloned()
        .collect();
    // clap takes only static names here (its `string` feature is off). The
    // top level's own arguments (the global -v/-q) come along; clap adds
    // --help and --version when it builds the command.
    let mut top = clap::Command::new("buildcage")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(cli.is_subcommand_required_set())
        .args(cli.get_arguments().cloned())
        .subcommands(shown);
    if let Some(about) = cli.get_about() {
        top = top.about(about.clone());
    }
    if let Some(after) = cli.get_after_long_help() {
        top = top.after_long_help(after.clone());
    }
    top
}

/// buildcage.1, with an EXIT STATUS section, and a page for every subcommand
/// at every depth, named as clap_mangen names them (`buildcage-policy-check.1`).
fn man_pages(
    cli: clap::Command,
    exit_status: &[(&str, &str)],
    dir: &std::path::Path,
) -> std::io::Result<()> {
    // As clap_mangen::generate_to does: `help` is no command to document, and
    // building sets each subcommand's display name (`buildcage-run`).
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    let shown = |cmd: &clap::Command| -> Vec<clap::Command> {
        cmd.get_subcommands()
            .filter(|sub| !sub.is_hide_set())
            .cloned()
            .collect()
    };
    let mut stack = shown(&cli);
    while let Some(sub) = stack.pop() {
        stack.extend(shown(&sub));
        // Each page's footer names the package, not the subcommand.
        Man::new(sub)
            .source(concat!("buildcage ", env!("CARGO_PKG_VERSION")))
            .generate_to(dir)?;
    }
    let top = Man::new(cli);
    let mut out = std::fs::File::create(dir.join(top.get_filename()))?;
    // The sections clap_mangen's `render` writes, but with the exit codes as
    // an EXIT STATUS list instead of its EXTRA section, which would run the
    // table of `--help` together into one paragraph.
    top.render_title(&mut out)?;
    top.render_name_section(&mut out)?;
    top.render_synopsis_section(&mut out)?;
    top.render_description_section(&mut out)?;
    top.render_options_section(&mut out)?;
    top.render_subcommands_section(&mut out)?;
    let mut roff = Roff::new();
    roff.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in exit_status {
        roff.control("TP", []);
        roff.text([bold(*code)]);
        roff.text([roman(*meaning)]);
    }
    roff.to_writer(&mut out)?;
    top.render_version_section(&mut out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;

    fn generate(what: &[&str]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "buildcage-generate-{}-{}",
            what.join("-"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut argv = vec!["buildcage", "generate"];
        argv.extend(what);
        argv.push(dir.to_str().expect("utf-8"));
        let crate::Command::Generate(args) = crate::Cli::parse_from(argv).command else {
            panic!("not parsed as generate");
        };
        let code = exec(&args, crate::Cli::command(), crate::EXIT_STATUS).expect("generate");
        assert_eq!(code, ExitCode::SUCCESS);
        dir
    }

    #[test]
    fn one_man_page_per_command_and_the_exit_codes_in_the_top_one() {
        let dir = generate(&["man"]);
        let mut pages: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        pages.sort();
        for page in [
            "buildcage.1",
            "buildcage-run.1",
            "buildcage-doctor.1",
            "buildcage-daemon.1",
            "buildcage-policy.1",
            "buildcage-policy-check.1",
            "buildcage-pkgsrc-make.1",
        ] {
            assert!(pages.iter().any(|p| p == page), "{page} in {pages:?}");
        }
        assert!(
            !pages
                .iter()
                .any(|p| p.contains("generate") || p.contains("help")),
            "{pages:?}"
        );
        let top = std::fs::read_to_string(dir.join("buildcage.1")).expect("read");
        assert!(top.contains(".SH \"EXIT STATUS\""), "{top}");
        assert!(top.contains("\\fB125\\fR"), "{top}");
        assert!(!top.contains("EXTRA"), "{top}");
        assert!(top.contains("\\-\\-verbose"), "{top}");
        let run = std::fs::read_to_string(dir.join("buildcage-run.1")).expect("read");
        assert!(run.contains("\\-\\-policy"), "{run}");
    }

    #[test]
    fn completions_offer_the_commands_but_not_the_hidden_one() {
        let dir = generate(&["completions", "bash"]);
        let script = std::fs::read_to_string(dir.join("buildcage.bash")).expect("read");
        assert!(script.contains("complete -F _buildcage"), "{script}");
        assert!(script.contains("buildcage__subcmd__run") || script.contains("run"));
        assert!(!script.contains("generate"), "{script}");
        // The global options, at the top and in a subcommand.
        assert!(script.contains("--verbose"), "{script}");
        for (shell, file) in [("zsh", "_buildcage"), ("fish", "buildcage.fish")] {
            let dir = generate(&["completions", shell]);
            let script = std::fs::read_to_string(dir.join(file)).expect("read");
            assert!(script.contains("pkgsrc"), "{shell}: {script}");
            assert!(!script.contains("generate"), "{shell}: {script}");
        }
    }

    #[test]
    fn help_ends_with_the_exit_codes() {
        let help = crate::Cli::command().render_long_help().to_string();
        let (_, table) = help.split_once("\nExit status:\n").expect("the exit codes");
        let row = |code: &str| {
            table
                .lines()
                .find(|l| l.trim_start().starts_with(code))
                .unwrap_or_else(|| panic!("no row {code}: {table}"))
                .to_owned()
        };
        assert!(row("CMD's").contains("the command's own exit status"));
        assert!(row("125").contains("buildcage failed before or around the command"));
        assert!(row("126, 127").contains("exits 125"));
    }
}
