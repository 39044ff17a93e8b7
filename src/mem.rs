//! The process's memory as the operating system sees it: the resident set size, and giving
//! freed heap pages back; and its CPU time. Used when many device actors retire at once (their memory would
//! otherwise stay with the allocator) and by the benchmarks that report memory.

/// Resident set size in bytes (Linux: `/proc/self/statm`); `None` elsewhere.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Returns free heap memory to the operating system. glibc keeps freed small allocations in
/// its arenas for reuse; after thousands of idle actors retire, that is memory the process
/// no longer needs. A no-op on other C libraries.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CPU time (user + system) this process has used so far.
pub fn cpu_time() -> std::time::Duration {
    // SAFETY: getrusage writes into the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return std::time::Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        std::time::Duration::from_secs(t.tv_sec as u64)
            + std::time::Duration::from_micros(t.tv_usec as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}
