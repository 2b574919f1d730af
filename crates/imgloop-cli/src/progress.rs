//! `-p` progress, drawn by indicatif. On a terminal: qemu-img's percentage
//! followed by a bar, bytes, rate and time left. Into a pipe or file:
//! exactly qemu-img's form, `    (42.00/100%)` lines ended by `\r`, so
//! scripts that read qemu-img's progress read imgloop's.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle, TermLike};
use std::io::{IsTerminal, Write};

/// Redraws per second at most.
const REDRAW_HZ: u8 = 10;

/// A progress indicator over a number of units (bytes, mostly).
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A progress indicator over `total` units; draws only when `enabled`.
    /// It shows 0% at once, as qemu-img does.
    pub fn new(enabled: bool, total: u64) -> Self {
        if !enabled {
            return Progress { bar: None };
        }
        let tty = std::io::stdout().is_terminal();
        let (target, template) = if tty {
            (
                ProgressDrawTarget::stdout_with_hz(REDRAW_HZ),
                "    ({percent2}/100%) {wide_bar} {binary_bytes}/{binary_total_bytes} \
                 {binary_bytes_per_sec} {eta}",
            )
        } else {
            (
                ProgressDrawTarget::term_like_with_hz(Box::new(QemuLines), REDRAW_HZ),
                "    ({percent2}/100%)",
            )
        };
        let style = ProgressStyle::with_template(template)
            .expect("the progress templates are valid")
            .with_key(
                "percent2",
                |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.2}", f64::from(state.fraction()) * 100.0);
                },
            );
        let bar = ProgressBar::with_draw_target(Some(total.max(1)), target).with_style(style);
        bar.tick();
        Progress { bar: Some(bar) }
    }

    /// Adds `n` finished units.
    pub fn add(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Sets the number of finished units.
    pub fn set(&self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
    }

    /// Shows 100% and ends the line.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
            println!();
        }
    }
}

/// Draws each state as qemu-img does when its output is not a terminal:
/// the text, then `\r`; no escape sequences, no padding.
#[derive(Debug)]
struct QemuLines;

impl TermLike for QemuLines {
    fn width(&self) -> u16 {
        80
    }

    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        writeln!(std::io::stdout().lock(), "{s}")
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        // The padding indicatif writes after a line, and its return to the
        // line's start, are left out: each state ends with `\r` instead.
        if s.trim().is_empty() {
            return Ok(());
        }
        write!(std::io::stdout().lock(), "{s}\r")
    }

    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}
