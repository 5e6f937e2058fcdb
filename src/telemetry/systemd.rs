//! systemd integration (`Type=notify`): READY once the stream started,
//! WATCHDOG pings from the apply loop, STOPPING at shutdown. Each call is a
//! no-op when not run by systemd (`NOTIFY_SOCKET` unset).

use sd_notify::NotifyState;

/// The service is ready: the replication stream started.
pub fn ready() {
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
}

/// The apply loop is alive (sent only when `WatchdogSec=` is set; the
/// environment is read once).
pub fn watchdog() {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| {
        let mut usec = 0;
        sd_notify::watchdog_enabled(false, &mut usec)
    });
    if enabled {
        let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
    }
}

/// Shutdown began.
pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}
