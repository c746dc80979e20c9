//! The mimalloc options both binaries (`api`, `worker`) run with. mimalloc, because the event
//! paths allocate many small JSON values; each binary declares the `#[global_allocator]` itself
//! (the benches count allocations with their own) and calls [`apply_options`] first in `main`.

/// Options applied unless the operator set them: lazy arena commit (less resident memory) and a
/// short purge delay (memory freed after a burst goes back sooner); see `docs/tuning.md`.
/// Each entry: the option's name, its older name (mimalloc honours both), the value.
pub const OPTIONS: [(&str, &str, &str); 2] = [
    (
        "MIMALLOC_ARENA_EAGER_COMMIT",
        "MIMALLOC_EAGER_REGION_COMMIT",
        "0",
    ),
    ("MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY", "50"),
];

/// mimalloc reads its options from the environment when the process starts, before `main`, so
/// the binary re-executes itself once with those of [`OPTIONS`] the environment lacks (none
/// lacking, or the re-execution failing: it runs as it is). An option counts as set under either
/// of its names in any letter case, as mimalloc reads them. The variables are read from the
/// process environment only: `.env` is loaded after this.
pub fn apply_options() {
    use std::os::unix::process::CommandExt;
    let set: Vec<String> = std::env::vars_os()
        .map(|(name, _)| name.to_string_lossy().to_ascii_uppercase())
        .collect();
    let missing: Vec<(&str, &str)> = OPTIONS
        .iter()
        .filter(|(name, old, _)| !set.iter().any(|s| s == name || s == old))
        .map(|&(name, _, value)| (name, value))
        .collect();
    if missing.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0); // as invoked, for usage lines and `ps`
    }
    command.args(args).envs(missing);
    let error = command.exec();
    eprintln!("could not restart with mimalloc's options set ({error}); continuing without them");
}
