//! The 16550 serial console (vm-superio) at COM1 and the per-VM console log.
//!
//! Output goes to a [`Console`]: a bounded ring of the last [`CONSOLE_LOG_BYTES_MAX`] bytes
//! plus live subscribers that receive complete lines through bounded channels. A slow
//! subscriber loses lines (counted), it never blocks the vCPU that writes.

use std::collections::VecDeque;
use std::io;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};

use super::{IrqLine, PioDevice};

/// First I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports of a 16550.
pub const COM1_PORTS: u16 = 8;
/// IRQ (GSI) of COM1.
pub const COM1_IRQ: u32 = 4;
/// Bytes of console output kept per VM.
pub const CONSOLE_LOG_BYTES_MAX: usize = 1 << 20;
/// Longest line delivered to subscribers; longer output is split.
pub const CONSOLE_LINE_BYTES_MAX: usize = 4096;
/// Lines buffered per live subscriber before it starts losing lines.
pub const CONSOLE_SUBSCRIBER_LINES_MAX: usize = 4096;

struct ConsoleInner {
    log: VecDeque<u8>,
    total_bytes: u64,
    partial_line: Vec<u8>,
    subscribers: Vec<SyncSender<String>>,
    dropped_lines: u64,
}

/// A VM's console: bounded log and live line subscribers. Cheap to clone (shared).
#[derive(Clone)]
pub struct Console {
    inner: Arc<Mutex<ConsoleInner>>,
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Console {
    /// An empty console.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(ConsoleInner {
                log: VecDeque::new(),
                total_bytes: 0,
                partial_line: Vec::new(),
                subscribers: Vec::new(),
                dropped_lines: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConsoleInner> {
        // A panic while holding this lock cannot leave the log inconsistent in a way that
        // matters (it is append-only), so recover from poisoning.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Append guest output.
    pub fn push(&self, bytes: &[u8]) {
        let mut c = self.lock();
        c.total_bytes += bytes.len() as u64;
        for &b in bytes {
            if c.log.len() == CONSOLE_LOG_BYTES_MAX {
                c.log.pop_front();
            }
            c.log.push_back(b);
            if b == b'\n' || c.partial_line.len() >= CONSOLE_LINE_BYTES_MAX {
                let line = std::mem::take(&mut c.partial_line);
                let mut text = String::from_utf8_lossy(&line).into_owned();
                if text.ends_with('\r') {
                    text.pop();
                }
                let mut dropped = 0;
                c.subscribers.retain(|s| match s.try_send(text.clone()) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        dropped += 1;
                        true
                    }
                    Err(TrySendError::Disconnected(_)) => false,
                });
                c.dropped_lines += dropped;
                if b != b'\n' {
                    c.partial_line.push(b);
                }
            } else {
                c.partial_line.push(b);
            }
        }
    }

    /// A live stream of complete lines from now on (bounded; a slow reader loses lines).
    pub fn subscribe(&self) -> Receiver<String> {
        let (tx, rx) = sync_channel(CONSOLE_SUBSCRIBER_LINES_MAX);
        self.lock().subscribers.push(tx);
        rx
    }

    /// The retained log (last [`CONSOLE_LOG_BYTES_MAX`] bytes).
    pub fn log(&self) -> Vec<u8> {
        self.lock().log.iter().copied().collect()
    }

    /// The retained log as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.log()).into_owned()
    }

    /// Total bytes ever written (including those dropped from the ring).
    pub fn total_bytes(&self) -> u64 {
        self.lock().total_bytes
    }

    /// Lines not delivered to slow subscribers.
    pub fn dropped_lines(&self) -> u64 {
        self.lock().dropped_lines
    }

    /// The unfinished last line (saved with the serial state so that a restored VM
    /// continues it).
    pub fn partial_line(&self) -> Vec<u8> {
        self.lock().partial_line.clone()
    }
}

/// Console writer handed to vm-superio.
struct ConsoleWriter(Console);

impl io::Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Adapter from our [`IrqLine`] to vm-superio's `Trigger`.
struct IrqTrigger(Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger();
        Ok(())
    }
}

/// Serializable state of the serial device (vm-superio's `SerialState` plus the console's
/// unfinished line).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
    pub partial_line: Vec<u8>,
}

/// COM1 on the port I/O bus.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A fresh 16550 writing to `console`, interrupting through `irq`.
    pub fn new(console: Console, irq: Arc<dyn IrqLine>) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(irq), ConsoleWriter(console)),
        }
    }

    /// Rebuild from saved state; the saved unfinished line is put back into `console`.
    pub fn from_state(
        state: &SerialDeviceState,
        console: Console,
        irq: Arc<dyn IrqLine>,
    ) -> Result<Self, SerialError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        console.push(&state.partial_line);
        let serial = Serial::from_state(
            &s,
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            ConsoleWriter(console),
        )
        .map_err(|e| SerialError::State(format!("{e:?}")))?;
        Ok(Self { serial })
    }

    /// Current state for snapshots.
    pub fn state(&self) -> SerialDeviceState {
        let s = self.serial.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            partial_line: self.serial.writer().0.partial_line(),
        }
    }
}

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Saved state rejected by vm-superio.
    #[error("invalid saved serial state: {0}")]
    State(String),
}

impl PioDevice for SerialDevice {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        if let Some(&b) = data.first() {
            // Errors here are interrupt delivery failures; output is already logged.
            let _ = self.serial.write(offset as u8, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct CountIrq(AtomicU32);
    impl IrqLine for CountIrq {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn output_reaches_log_and_subscribers() {
        let console = Console::new();
        let rx = console.subscribe();
        let mut dev = SerialDevice::new(console.clone(), Arc::new(CountIrq::default()));
        for b in b"hello\r\nwor" {
            dev.pio_write(0, &[*b]);
        }
        assert_eq!(rx.try_recv().unwrap(), "hello");
        assert!(rx.try_recv().is_err());
        assert_eq!(console.text(), "hello\r\nwor");
        assert_eq!(console.partial_line(), b"wor");
    }

    #[test]
    fn flood_is_bounded_and_slow_reader_loses_lines() {
        let console = Console::new();
        let rx = console.subscribe();
        let line = vec![b'x'; 99];
        for _ in 0..(CONSOLE_SUBSCRIBER_LINES_MAX + 50_000) {
            console.push(&line);
            console.push(b"\n");
        }
        assert_eq!(console.log().len(), CONSOLE_LOG_BYTES_MAX);
        assert_eq!(console.dropped_lines(), 50_000);
        assert_eq!(rx.try_iter().count(), CONSOLE_SUBSCRIBER_LINES_MAX);
        // A line without newline is split, never grows without bound.
        console.push(&vec![b'y'; CONSOLE_LINE_BYTES_MAX * 3]);
        assert!(console.partial_line().len() <= CONSOLE_LINE_BYTES_MAX);
    }

    #[test]
    fn state_roundtrip_continues_partial_line() {
        let console = Console::new();
        let mut dev = SerialDevice::new(console.clone(), Arc::new(CountIrq::default()));
        dev.pio_write(3, &[0x03]); // LCR: 8N1
        dev.pio_write(7, &[0x42]); // scratch
        for b in b"HB seq=" {
            dev.pio_write(0, &[*b]);
        }
        let st = dev.state();
        assert_eq!(st.scratch, 0x42);
        let console2 = Console::new();
        let rx = console2.subscribe();
        let mut dev2 =
            SerialDevice::from_state(&st, console2.clone(), Arc::new(CountIrq::default())).unwrap();
        for b in b"5\n" {
            dev2.pio_write(0, &[*b]);
        }
        assert_eq!(rx.try_recv().unwrap(), "HB seq=5");
        let mut b = [0u8];
        dev2.pio_read(7, &mut b);
        assert_eq!(b[0], 0x42);
    }
}
