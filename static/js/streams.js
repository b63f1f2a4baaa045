// A small pool of event streams. Browsers open at most 6 HTTP/1.1 connections to a host and an
// event stream holds one until its job ends; with every one taken, even GET /v1/cluster would
// wait. Past MAX_STREAMS, a job waits for a stream and is polled meanwhile.

const MAX_STREAMS = 3;
const POLL_MS = 2000;
let open = 0;
const waiting = [];  // grant functions, oldest first

function acquire(poll) {
  if (open < MAX_STREAMS) {
    open += 1;
    return Promise.resolve(true);
  }
  return new Promise((resolve) => {
    const grant = () => {
      clearInterval(timer);
      resolve(true);
    };
    const timer = setInterval(async () => {
      if (!(await poll())) return;
      const index = waiting.indexOf(grant);
      if (index < 0) return;  // granted while the poll was on its way
      waiting.splice(index, 1);
      clearInterval(timer);
      resolve(false);
    }, POLL_MS);
    waiting.push(grant);
  });
}

function release() {
  const next = waiting.shift();
  if (next) next();  // the stream passes straight to the next job
  else open -= 1;
}

/**
 * Run follow() once a stream is free. Until then poll() runs every few seconds; when it
 * returns true (the job ended meanwhile) follow() is skipped. Returns whether follow() ran.
 */
export async function withStream(follow, poll) {
  if (!(await acquire(poll))) return false;
  try {
    await follow();
  } finally {
    release();
  }
  return true;
}
