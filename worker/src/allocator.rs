//! Both binaries (`api`, `worker`) allocate with mimalloc: the event paths allocate many small
//! JSON values, and glibc's malloc cost a quarter to a third of their CPU. Each binary declares
//! the `#[global_allocator]` itself (the benches count allocations with their own) and calls
//! [`lazy_arena_commit`] first thing in `main`.

/// mimalloc commits its arenas eagerly by default, which kept about 20 MiB more resident than the
/// heap needs (idle and under load). It reads its options from the environment when the process
/// starts, before `main`, so the binary re-executes itself once with lazy commit, unless the operator
/// set `MIMALLOC_ARENA_EAGER_COMMIT` already (or the re-execution fails: then it runs as it is).
/// The variable is read from the process environment only: `.env` is loaded after this.
pub fn lazy_arena_commit() {
    use std::os::unix::process::CommandExt;
    const OPTION: &str = "MIMALLOC_ARENA_EAGER_COMMIT";
    if std::env::var_os(OPTION).is_some() {
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
    let error = command.args(args).env(OPTION, "0").exec();
    eprintln!("could not restart with {OPTION}=0 ({error}); continuing with eager commit");
}
