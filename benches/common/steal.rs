//! The CPU time a hypervisor took from this machine while a bench ran (steal).

/// The machine's CPU time so far, all of it and the part its hypervisor gave to others
/// (`/proc/stat`'s steal), where Linux tells.
pub struct CpuTimes(Option<(u64, u64)>);

impl CpuTimes {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").ok();
        let line = stat.as_deref().and_then(|stat| stat.lines().next());
        let ticks: Option<Vec<u64>> = line.map(|line| {
            let fields = line.split_whitespace().skip(1).take(8);
            fields.filter_map(|field| field.parse().ok()).collect()
        });
        CpuTimes(
            ticks
                .filter(|ticks| ticks.len() == 8)
                .map(|ticks| (ticks.iter().sum(), ticks[7])),
        )
    }

    /// The share stolen since `self`.
    pub fn stolen(&self) -> Option<f64> {
        let ((total, steal), (total_now, steal_now)) = (self.0?, CpuTimes::now().0?);
        let elapsed = total_now.checked_sub(total).filter(|&ticks| ticks > 0)?;
        Some(steal_now.saturating_sub(steal) as f64 / elapsed as f64)
    }
}
