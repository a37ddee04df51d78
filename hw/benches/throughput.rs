//! How many requests per second the device sustains, with a driver loop that does almost
//! nothing (fixed chains republished as soon as they complete). A measurement, so a bench:
//!
//! `cargo bench -p crypt-vfio-hw --bench throughput`

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use common::*;
use crypt_vfio_hw::DeviceConfig;
use crypt_vfio_spec::crypto::{cipher, status as st};
use crypt_vfio_spec::ring::{avail_event_offset, need_event, DESC_F_NEXT, DESC_F_WRITE, USED_IDX, USED_RING};

/// CPU time (user + system) the device's worker threads have used so far, from /proc.
fn worker_cpu() -> Duration {
    let ticks = |tid: &std::path::Path| -> Option<u64> {
        let comm = std::fs::read_to_string(tid.join("comm")).ok()?;
        if !comm.starts_with("crypt-hw-") {
            return None;
        }
        let stat = std::fs::read_to_string(tid.join("stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?)
    };
    let total: u64 =
        std::fs::read_dir("/proc/self/task").unwrap().filter_map(|e| ticks(&e.ok()?.path())).sum();
    // SAFETY: plain query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_secs_f64(total as f64 / hz as f64)
}

fn atomic(rig: &Rig, iova: u64) -> &AtomicU16 {
    // SAFETY: 2-byte aligned ring field inside the rig's memory.
    unsafe { AtomicU16::from_ptr(rig.host(iova) as *mut u16) }
}

/// Runs `secs` seconds of `len`-byte encryptions with `algo`; returns requests per second.
fn run(cfg: DeviceConfig, algo: u32, len: usize, secs: f64) -> f64 {
    let size = 256u16;
    let mut rig = Rig::with_sizes(cfg, size, 2 * len + 256);
    let key_len = if algo == cipher::AES_XTS { 64 } else { 32 };
    let session = rig.create_cipher(algo, &pattern(key_len, 1), true).session_id;
    let chains = size / 2;
    for k in 0..chains {
        let (head, tail) = (2 * k, 2 * k + 1);
        let slot = rig.slot(0, head);
        let mut out = cipher_hdr(session, true, algo, 16, len).encode().to_vec();
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(&pattern(len, k as u8));
        rig.write(slot, &out);
        let dst = slot + out.len() as u64;
        rig.raw_desc(0, head, slot, out.len() as u32, DESC_F_NEXT, tail);
        rig.raw_desc(0, tail, dst, len as u32 + 1, DESC_F_WRITE, 0);
    }
    let (avail, used) = (rig.queues[0].avail, rig.queues[0].used);
    let avail_idx = atomic(&rig, avail + 2);
    let used_idx = atomic(&rig, used + USED_IDX);
    let avail_event = atomic(&rig, used + avail_event_offset(size));
    let mask = size - 1;
    let mut next_avail: u16 = 0;
    let mut last_used: u16 = 0;
    let push = |rig: &Rig, at: u16, head: u16| {
        // SAFETY: avail ring entry inside the rig's memory.
        unsafe { (rig.host(avail + 4 + 2 * u64::from(at & mask)) as *mut u16).write_volatile(head) }
    };
    for k in 0..chains {
        push(&rig, next_avail, 2 * k);
        next_avail = next_avail.wrapping_add(1);
    }
    avail_idx.store(next_avail, Ordering::Release);
    rig.kick(0);
    let start = Instant::now();
    let cpu0 = worker_cpu();
    let mut completed = 0u64;
    let mut kicks = 0u64;
    let dur = Duration::from_secs_f64(secs);
    while start.elapsed() < dur {
        for _ in 0..64 {
            let idx = used_idx.load(Ordering::Acquire);
            if idx == last_used {
                std::hint::spin_loop();
                continue;
            }
            let old = next_avail;
            while last_used != idx {
                let at = used + USED_RING + 8 * u64::from(last_used & mask);
                // SAFETY: used ring element inside the rig's memory.
                let id = unsafe { (rig.host(at) as *const u32).read_volatile() } as u16;
                push(&rig, next_avail, id);
                next_avail = next_avail.wrapping_add(1);
                last_used = last_used.wrapping_add(1);
                completed += 1;
            }
            avail_idx.store(next_avail, Ordering::Release);
            fence(Ordering::SeqCst);
            if need_event(avail_event.load(Ordering::Relaxed), next_avail, old) {
                rig.kick(0);
                kicks += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (worker_cpu() - cpu0).as_secs_f64();
    let status = rig.read(rig.slot(0, 0) + 72 + 16 + len as u64 + len as u64, 1)[0];
    assert_eq!(status, st::OK);
    let stats = rig.dev.stats();
    let rate = completed as f64 / elapsed;
    eprintln!(
        "  {len:>5} B: {:>8.0} req/s ({:.2} GB/s), worker CPU {:.0} ns/req ({:.0}% busy), {kicks} kicks, {} interrupts, {} completed by device",
        rate,
        rate * len as f64 / 1e9,
        cpu * 1e9 / completed as f64,
        100.0 * cpu / elapsed,
        stats.interrupts,
        stats.data_completed
    );
    rate
}

fn main() {
    let base = DeviceConfig { data_queues: 1, max_queue_size: 256, ..Default::default() };
    eprintln!("null_crypto, 1 worker:");
    for len in [16, 512, 4096] {
        run(DeviceConfig { null_crypto: true, ..base.clone() }, cipher::AES_CBC, len, 2.0);
    }
    for (name, algo) in [("AES-256-CBC", cipher::AES_CBC), ("AES-256-XTS", cipher::AES_XTS)] {
        eprintln!("{name} encrypt (aws-lc), 1 worker:");
        for len in [512, 4096, 65536] {
            run(base.clone(), algo, len, 1.5);
        }
    }
}
