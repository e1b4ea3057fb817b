//! The floor: what the bytes of one job cost on this machine, whatever the program that moves
//! them. A job's image arrives as base64 (4/3 of its size) and leaves as itself, and its SHA-256
//! is computed once: so the floor is one receive of the answer, one send of the image and one
//! SHA-256 of it, each timed as the CPU time of the thread that does it, over loopback TCP, the
//! least of [`REPEAT`] tries (what the bytes cost at best: the median moved by 0.3 ms from one
//! invocation to the next while Garage freed the previous runs' blocks in the background).
//!
//! On loopback the kernel's receive processing runs in the sender's context: a send is charged
//! the copy in and the delivery, a receive only the copy out. The worker is charged the same way
//! (its receives from the fake API, its sends to the S3 server).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use super::*;

/// Repetitions of each measurement; the least is kept.
const REPEAT: usize = 51;

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn least(v: Vec<Duration>) -> Duration {
    v.into_iter().min().unwrap_or_default()
}

/// The CPU time of sending `bytes` over loopback TCP (`sender`: the sending thread's, else the
/// receiving thread's), the least of [`REPEAT`] transfers on one connection.
fn transfer(bytes: usize, sender: bool) -> anyhow::Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let data = vec![0x5au8; bytes];
    let receiving = std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
        let (mut socket, _) = listener.accept()?;
        let mut buf = vec![0u8; bytes];
        let mut times = Vec::with_capacity(REPEAT);
        for _ in 0..REPEAT {
            let start = thread_cpu();
            socket.read_exact(&mut buf)?;
            times.push(thread_cpu() - start);
            socket.write_all(b"k")?;
        }
        Ok(times)
    });
    let mut socket = TcpStream::connect(addr)?;
    socket.set_nodelay(true)?;
    let mut sent = Vec::with_capacity(REPEAT);
    let mut ack = [0u8; 1];
    for _ in 0..REPEAT {
        let start = thread_cpu();
        socket.write_all(&data)?;
        sent.push(thread_cpu() - start);
        socket.read_exact(&mut ack)?;
    }
    let received = receiving
        .join()
        .map_err(|_| anyhow::anyhow!("the receiving thread panicked"))??;
    Ok(least(if sender { sent } else { received }))
}

/// The floor of a job whose image is `image_bytes`: its parts in ms, and their sum.
pub(crate) fn measure(image_bytes: usize) -> anyhow::Result<Value> {
    let image: Vec<u8> = (0..image_bytes).map(|_| fastrand::u8(..)).collect();
    let sha = least(
        (0..REPEAT)
            .map(|_| {
                let start = thread_cpu();
                std::hint::black_box(Sha256::digest(std::hint::black_box(&image)));
                thread_cpu() - start
            })
            .collect(),
    );
    // The answer: the base64 of the image, and a few hundred bytes of JSON around it.
    let answer_bytes = image_bytes.div_ceil(3) * 4 + 400;
    let receive = transfer(answer_bytes, false)?;
    let send = transfer(image_bytes, true)?;
    let ms = |d: Duration| round(d.as_secs_f64() * 1000.0, 3);
    Ok(json!({
        "image_bytes": image_bytes,
        "sha256_ms": ms(sha),
        "receive_answer_ms": ms(receive),
        "answer_bytes": answer_bytes,
        "send_image_ms": ms(send),
        "floor_ms": ms(sha + receive + send),
    }))
}
