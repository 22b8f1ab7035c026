//! Where the guest's serial console goes: to our stderr with `--console`, and
//! always into a short tail kept for error reports.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// How much console output is kept for an error report.
const TAIL_BYTES: usize = 8 * 1024;
/// A line the guest has not ended by this length is shown as it is: the
/// guest decides when a newline comes, not how much uvm holds.
const MAX_LINE: usize = 4 * 1024;

#[derive(Default)]
struct State {
    tail: VecDeque<u8>,
    line: Vec<u8>,
}

/// The console log, shared by the serial device (writer) and the VMM (reader).
#[derive(Clone)]
pub struct Console {
    echo: bool,
    state: Arc<Mutex<State>>,
}

impl Console {
    pub fn new(echo: bool) -> Self {
        Self {
            echo,
            state: Arc::default(),
        }
    }

    /// The last bytes the guest printed, lossily decoded.
    pub fn tail(&self) -> String {
        let state = self.lock();
        String::from_utf8_lossy(&state.tail.iter().copied().collect::<Vec<_>>()).into_owned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock(&self.state)
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.lock();
        state.tail.extend(buf);
        let excess = state.tail.len().saturating_sub(TAIL_BYTES);
        state.tail.drain(..excess);
        if self.echo {
            // Whole lines at a time: one host write per line, not per byte.
            state.line.extend_from_slice(buf);
            if buf.contains(&b'\n') || state.line.len() >= MAX_LINE {
                io::stderr().write_all(&state.line)?;
                state.line.clear();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut state = self.lock();
        io::stderr().write_all(&state.line)?;
        state.line.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_tail() {
        let mut console = Console::new(false);
        console.write_all(&vec![b'a'; TAIL_BYTES]).unwrap();
        console.write_all(b"end").unwrap();
        let tail = console.tail();
        assert_eq!(tail.len(), TAIL_BYTES);
        assert!(tail.ends_with("aend"));
    }

    #[test]
    fn a_line_without_end_is_shown_before_it_grows_past_the_bound() {
        let mut console = Console::new(true);
        for _ in 0..100 {
            console.write_all(&[b'x'; 1000]).unwrap();
            assert!(console.lock().line.len() < MAX_LINE + 1000);
        }
    }
}
