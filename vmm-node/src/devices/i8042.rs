//! The i8042 controller, reduced to what guests use to reset the machine: a write of
//! 0xfe to port 0x64 requests a reset, which the VMM turns into a VM stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::PioDevice;

/// First port of the i8042 (data port); the command port is `I8042_PORT + 4`.
pub const I8042_PORT: u16 = 0x60;
/// Number of ports covered (0x60..=0x64).
pub const I8042_PORTS: u16 = 5;

/// Minimal i8042: status reads as "no data", command 0xfe (CPU reset) sets the reset flag.
pub struct I8042 {
    reset_requested: Arc<AtomicBool>,
    on_reset: Box<dyn Fn() + Send>,
}

impl I8042 {
    /// A controller that sets `reset_requested` and calls `on_reset` on a reset command.
    pub fn new(reset_requested: Arc<AtomicBool>, on_reset: Box<dyn Fn() + Send>) -> Self {
        Self {
            reset_requested,
            on_reset,
        }
    }
}

impl PioDevice for I8042 {
    fn pio_read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) {
            self.reset_requested.store(true, Ordering::SeqCst);
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_sets_flag_and_calls_back() {
        let flag = Arc::new(AtomicBool::new(false));
        let called = Arc::new(AtomicBool::new(false));
        let c = called.clone();
        let mut dev = I8042::new(
            flag.clone(),
            Box::new(move || c.store(true, Ordering::SeqCst)),
        );
        dev.pio_write(0, &[0xfe]);
        assert!(!flag.load(Ordering::SeqCst));
        dev.pio_write(4, &[0xfe]);
        assert!(flag.load(Ordering::SeqCst));
        assert!(called.load(Ordering::SeqCst));
        let mut b = [0xffu8];
        dev.pio_read(4, &mut b);
        assert_eq!(b, [0]);
    }
}
