//! Every thread rdmig spawns starts here, so a VMM can apply its own policy to it (a seccomp
//! filter, CPU affinity, a scheduling class) through [`set_thread_hook`].

use std::io;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

/// Runs on each new rdmig thread, in that thread, with the thread's name, before its work.
pub type ThreadHook = Arc<dyn Fn(&str) + Send + Sync>;

static HOOK: RwLock<Option<ThreadHook>> = RwLock::new(None);

/// Sets (or with `None` removes) the hook for threads spawned from now on, process-wide.
pub fn set_thread_hook(hook: Option<ThreadHook>) {
    *HOOK.write().unwrap_or_else(|p| p.into_inner()) = hook;
}

/// Spawns a named thread that runs the hook, then `f`.
pub(crate) fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    let hook = HOOK.read().unwrap_or_else(|p| p.into_inner()).clone();
    let owned = name.to_string();
    std::thread::Builder::new()
        .name(owned.clone())
        .spawn(move || {
            if let Some(h) = hook {
                h(&owned);
            }
            f()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn the_hook_runs_in_each_new_thread_with_its_name() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        set_thread_hook(Some(Arc::new(move |name: &str| {
            let here = std::thread::current().name().map(str::to_string);
            s.lock().unwrap().push((name.to_string(), here));
        })));
        spawn("rdmig-test", || ()).unwrap().join().unwrap();
        set_thread_hook(None);
        let got = seen.lock().unwrap();
        assert!(got
            .iter()
            .any(|(n, h)| n == "rdmig-test" && h.as_deref() == Some("rdmig-test")));
    }
}
