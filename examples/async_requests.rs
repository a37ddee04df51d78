//! Many AES-GCM requests in flight at once through the async API, under `futures`' executor.
//!
//! `cargo run --example async_requests [DEVICE]` (default `emulated`). The futures come from
//! [`AsyncQueue`], which works under any executor: in polling mode each future polls the device
//! itself, so no reactor is needed; `futures::executor::block_on` drives them here.

use crypt_vfio::engine::async_api::AsyncQueue;
use crypt_vfio::engine::{Buf, Engine};
use crypt_vfio::Mode;
use futures::executor::block_on;
use futures::future::join_all;

fn main() -> Result<(), crypt_vfio::Error> {
    let device = std::env::args().nth(1).unwrap_or_else(|| "emulated".into());
    let engine = crypt_vfio::open(&device)?;
    println!("engine: {}", engine.describe());
    let session = engine.create_session(Mode::Gcm, &[7u8; 16])?;
    // Futures drive the queue themselves unless the engine delivers completions on its own.
    let queue = AsyncQueue::open(&engine, 0)?;

    let messages: Vec<Vec<u8>> = (0..64u32).map(|i| format!("message number {i}").into_bytes()).collect();
    block_on(async {
        // All 64 requests are submitted before the first completes.
        let sealed = join_all(messages.iter().enumerate().map(|(i, m)| {
            let (queue, session) = (queue.clone(), session.clone());
            async move {
                let nonce = nonce(i);
                let (ct, tag) = queue.encrypt(session, &nonce, b"", Buf::Host(m.clone())).await?;
                Ok::<_, crypt_vfio::Error>((ct, tag))
            }
        }))
        .await;
        let opened = join_all(sealed.into_iter().enumerate().map(|(i, r)| {
            let (queue, session) = (queue.clone(), session.clone());
            async move {
                let (ct, tag) = r?;
                queue.decrypt(session, &nonce(i), b"", ct, tag).await
            }
        }))
        .await;
        for (m, pt) in messages.iter().zip(opened) {
            assert_eq!(pt?.as_slice().as_ref(), m.as_slice());
        }
        println!("{} messages sealed and opened concurrently", messages.len());
        Ok::<(), crypt_vfio::Error>(())
    })?;
    engine.destroy_session(&session)?;
    Ok(())
}

/// A nonce of its own for each message (a GCM nonce must never repeat under one key).
fn nonce(i: usize) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&(i as u64).to_le_bytes());
    n
}
