//! What the harness reads from the operating system: a process-wide monotonic
//! clock, CPU time and RSS of a process (`/proc`), kernel socket memory
//! (`/proc/net/sockstat`), open-file counts and limits.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Starts the process clock; call once at the top of `main` so every thread
/// shares the same zero.
pub fn init_clock() {
    START.get_or_init(Instant::now);
}

/// Nanoseconds since the process clock started. Monotonic and shared by every
/// thread, so a timestamp written by a publisher can be subtracted from one
/// read by a receiver in another thread.
#[inline]
pub fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Clock ticks per second of `/proc/*/stat` CPU times.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// Name prefix of roomcast's event-loop threads (`roomcast-loop-0`, `-1`, …);
/// the per-loop CPU and `loop_balance` are taken over the server's threads
/// whose name starts with it.
pub const LOOP_THREAD_PREFIX: &str = "roomcast-loop-";

/// One thread of a process at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCpu {
    pub tid: i32,
    /// `comm` (at most 15 bytes: Linux truncates thread names).
    pub name: String,
    /// utime + stime, microseconds.
    pub us: u64,
}

/// Every thread of a process (`/proc/PID/task/*/stat`), by thread id.
/// Threads that exit while the directory is read are left out.
pub fn task_cpu(pid: u32) -> Vec<TaskCpu> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<TaskCpu> = dir
        .filter_map(|e| {
            let tid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
            let (name, us) = parse_stat_name_cpu(&text)?;
            Some(TaskCpu { tid, name, us })
        })
        .collect();
    out.sort_by_key(|t| t.tid);
    out
}

/// (comm, utime + stime in µs) of one `stat` line.
fn parse_stat_name_cpu(text: &str) -> Option<(String, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_string();
    let (user, kernel) = parse_stat_cpu(text)?;
    Some((name, user + kernel))
}

/// utime + stime of a `/proc/.../stat` file, in microseconds.
pub fn cpu_us_of(stat_path: &str) -> Option<u64> {
    cpu_split_us_of(stat_path).map(|(user, kernel)| user + kernel)
}

/// (utime, stime) of a `/proc/.../stat` file, in microseconds.
pub fn cpu_split_us_of(stat_path: &str) -> Option<(u64, u64)> {
    parse_stat_cpu(&std::fs::read_to_string(stat_path).ok()?)
}

/// (utime, stime) in microseconds of the text of a `stat` file.
fn parse_stat_cpu(text: &str) -> Option<(u64, u64)> {
    // The command name (field 2) may contain spaces and parentheses: fields
    // are counted after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks();
    Some((utime * 1_000_000 / ticks, stime * 1_000_000 / ticks))
}

/// CPU time of one thread of this process, microseconds.
pub fn thread_cpu_us(tid: i32) -> Option<u64> {
    cpu_us_of(&format!("/proc/self/task/{tid}/stat"))
}

/// The calling thread's kernel id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// VmRSS of a process in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS:").map(|kb| kb * 1024)
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Whether a process with this PID exists.
pub fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Number of open file descriptors of a process (entries of `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Soft "Max open files" limit of a process, from `/proc/PID/limits`.
pub fn fd_limit_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The TCP line of `/proc/net/sockstat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SockStat {
    /// Sockets in use (both ends of a loopback connection count).
    pub inuse: u64,
    /// Sockets in TIME_WAIT.
    pub tw: u64,
    /// Orphaned sockets (closed by their process, still in the kernel).
    pub orphan: u64,
    /// Kernel memory charged to TCP sockets, in bytes (pages × 4096).
    pub mem_bytes: u64,
}

pub fn sockstat() -> SockStat {
    let mut out = SockStat::default();
    let Ok(text) = std::fs::read_to_string("/proc/net/sockstat") else {
        return out;
    };
    let Some(line) = text.lines().find(|l| l.starts_with("TCP:")) else {
        return out;
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    for pair in words[1..].chunks(2) {
        if let [key, value] = pair {
            let value: u64 = value.parse().unwrap_or(0);
            match *key {
                "inuse" => out.inuse = value,
                "tw" => out.tw = value,
                "orphan" => out.orphan = value,
                "mem" => out.mem_bytes = value * 4096,
                _ => {}
            }
        }
    }
    out
}

/// Raises this process's open-files soft limit to its hard limit and
/// returns the limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// A snapshot of CPU counters at one instant, for a window's difference.
#[derive(Debug, Clone, Default)]
pub struct CpuSnap {
    pub at_ns: u64,
    /// Machine-wide (busy, total) jiffies from `/proc/stat`.
    pub machine: (u64, u64),
    pub server_us: Option<u64>,
    /// The server's CPU time spent in the kernel.
    pub server_kernel_us: Option<u64>,
    pub client_us: u64,
    /// This process's CPU time spent in the kernel.
    pub client_kernel_us: u64,
    pub threads_us: Vec<u64>,
    /// The server's threads (empty without a server PID).
    pub server_threads: Vec<TaskCpu>,
}

pub fn cpu_snap(server_pid: Option<u32>, tids: &[i32]) -> CpuSnap {
    let server = server_pid.and_then(|pid| cpu_split_us_of(&format!("/proc/{pid}/stat")));
    let client = cpu_split_us_of("/proc/self/stat").unwrap_or_default();
    CpuSnap {
        at_ns: now_ns(),
        machine: machine_jiffies(),
        server_us: server.map(|(user, kernel)| user + kernel),
        server_kernel_us: server.map(|(_, kernel)| kernel),
        client_us: client.0 + client.1,
        client_kernel_us: client.1,
        threads_us: tids
            .iter()
            .map(|&t| thread_cpu_us(t).unwrap_or(0))
            .collect(),
        server_threads: server_pid.map(task_cpu).unwrap_or_default(),
    }
}

/// CPU use over a window, as a percentage of one core.
#[derive(Debug, Clone, Default)]
pub struct CpuWindow {
    pub secs: f64,
    pub server_pct: Option<f64>,
    pub server_us: Option<u64>,
    /// The server's CPU time in the kernel (syscalls, and on loopback the
    /// receiving side's TCP work, which runs in the sender's syscall).
    pub server_kernel_us: Option<u64>,
    pub client_pct: f64,
    pub client_us: u64,
    pub client_kernel_us: u64,
    pub threads_pct: Vec<f64>,
    /// Busy CPU of the whole machine, % of one core (all cores together).
    pub machine_pct: f64,
    /// The server's threads that used CPU in the window, in thread-id order:
    /// (name, % of one core). Names shared by several threads get `#2`, `#3`, …
    pub server_threads_pct: ThreadPcts,
    /// The server's event loops ([`LOOP_THREAD_PREFIX`]), idle ones included,
    /// in loop order: (name, % of one core).
    pub loops_pct: ThreadPcts,
}

impl CpuWindow {
    /// Least busy loop ÷ busiest loop (1 = even); None without loop threads
    /// or when no loop used any CPU.
    pub fn loop_balance(&self) -> Option<f64> {
        let max = self.loops_pct.iter().map(|l| l.1).fold(f64::NAN, f64::max);
        let min = self.loops_pct.iter().map(|l| l.1).fold(f64::NAN, f64::min);
        (max > 0.0).then(|| min / max)
    }
}

/// (thread name, % of one core), per thread.
pub type ThreadPcts = Vec<(String, f64)>;

/// Per-thread CPU of the server over a window: (all threads that used any,
/// the event loops). A thread that started in the window counts from zero;
/// one that ended in it is gone from `/proc` and left out.
fn server_threads_window(
    a: &[TaskCpu],
    b: &[TaskCpu],
    pct: impl Fn(u64) -> f64,
) -> (ThreadPcts, ThreadPcts) {
    let mut seen: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    let mut all = Vec::new();
    let mut loops = Vec::new();
    for t in b {
        let before = a.iter().find(|x| x.tid == t.tid).map_or(0, |x| x.us);
        let used = t.us.saturating_sub(before);
        let n = seen.entry(t.name.as_str()).or_insert(0);
        *n += 1;
        let name = if *n == 1 {
            t.name.clone()
        } else {
            format!("{}#{}", t.name, n)
        };
        if t.name.starts_with(LOOP_THREAD_PREFIX) {
            loops.push((name.clone(), pct(used)));
        }
        if used > 0 {
            all.push((name, pct(used)));
        }
    }
    // Loop order: by the number after the prefix, then by name.
    loops.sort_by(|x, y| {
        let index = |s: &str| {
            s[LOOP_THREAD_PREFIX.len()..]
                .split('#')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(u64::MAX)
        };
        index(&x.0).cmp(&index(&y.0)).then_with(|| x.0.cmp(&y.0))
    });
    (all, loops)
}

/// (busy, total) jiffies of all CPUs together; steal counts as busy.
fn machine_jiffies() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = text.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return (0, 0);
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    (total - idle, total)
}

pub fn cpu_window(a: &CpuSnap, b: &CpuSnap) -> CpuWindow {
    let secs = (b.at_ns.saturating_sub(a.at_ns)) as f64 / 1e9;
    let pct = |us: u64| {
        if secs > 0.0 {
            us as f64 / 1e6 / secs * 100.0
        } else {
            0.0
        }
    };
    let server_us = match (a.server_us, b.server_us) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x)),
        _ => None,
    };
    let (server_threads_pct, loops_pct) =
        server_threads_window(&a.server_threads, &b.server_threads, pct);
    CpuWindow {
        secs,
        server_threads_pct,
        loops_pct,
        server_pct: server_us.map(pct),
        server_us,
        server_kernel_us: match (a.server_kernel_us, b.server_kernel_us) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x)),
            _ => None,
        },
        client_pct: pct(b.client_us.saturating_sub(a.client_us)),
        client_us: b.client_us.saturating_sub(a.client_us),
        client_kernel_us: b.client_kernel_us.saturating_sub(a.client_kernel_us),
        threads_pct: a
            .threads_us
            .iter()
            .zip(&b.threads_us)
            .map(|(x, y)| pct(y.saturating_sub(*x)))
            .collect(),
        machine_pct: {
            let busy = b.machine.0.saturating_sub(a.machine.0);
            let total = b.machine.1.saturating_sub(a.machine.1);
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            if total > 0 {
                busy as f64 / total as f64 * cores * 100.0
            } else {
                0.0
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(tid: i32, name: &str, us: u64) -> TaskCpu {
        TaskCpu {
            tid,
            name: name.into(),
            us,
        }
    }

    #[test]
    fn stat_name_may_hold_spaces_and_parentheses() {
        let ticks = clock_ticks();
        let line = format!(
            "42 (odd (name) x) S 1 42 42 0 -1 4194560 100 0 0 0 {} {} 0 0 20 0 1 0 5 0 0",
            3 * ticks,
            ticks
        );
        let (name, us) = parse_stat_name_cpu(&line).unwrap();
        assert_eq!(name, "odd (name) x");
        assert_eq!(us, 4_000_000);
    }

    #[test]
    fn server_threads_over_a_window() {
        let a = vec![
            task(10, "roomcast", 1_000),
            task(11, "roomcast-loop-0", 5_000),
            task(12, "roomcast-loop-1", 5_000),
            task(13, "worker", 0),
            task(14, "worker", 0),
            task(15, "gone", 7),
        ];
        let b = vec![
            task(10, "roomcast", 1_000),
            task(11, "roomcast-loop-0", 505_000),
            task(12, "roomcast-loop-1", 255_000),
            task(13, "worker", 10_000),
            task(14, "worker", 20_000),
            task(16, "roomcast-loop-2", 0),
        ];
        // 1 s window: 1,000,000 µs = 100 % of a core.
        let (all, loops) = server_threads_window(&a, &b, |us| us as f64 / 1e4);
        let names: Vec<&str> = all.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(
            names,
            ["roomcast-loop-0", "roomcast-loop-1", "worker", "worker#2"]
        );
        assert_eq!(all[0].1, 50.0);
        assert_eq!(all[3].1, 2.0);
        assert_eq!(
            loops,
            vec![
                ("roomcast-loop-0".to_string(), 50.0),
                ("roomcast-loop-1".to_string(), 25.0),
                ("roomcast-loop-2".to_string(), 0.0)
            ]
        );
        let mut w = CpuWindow {
            loops_pct: loops[..2].to_vec(),
            ..CpuWindow::default()
        };
        assert_eq!(w.loop_balance(), Some(0.5));
        w.loops_pct = loops;
        assert_eq!(w.loop_balance(), Some(0.0));
        w.loops_pct.clear();
        assert_eq!(w.loop_balance(), None);
    }

    #[test]
    fn this_process_threads_are_listed_by_name() {
        let handle = std::thread::Builder::new()
            .name("roomcast-loop-7".into())
            .spawn(|| std::thread::sleep(std::time::Duration::from_millis(300)))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let tasks = task_cpu(std::process::id());
        handle.join().unwrap();
        assert!(
            tasks.iter().any(|t| t.name == "roomcast-loop-7"),
            "{tasks:?}"
        );
    }
}
