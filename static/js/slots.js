// How many answers this browser streams at once, across all its Tidechat tabs.
//
// A browser opens at most six HTTP/1.1 connections to one origin, shared by every tab, and
// each open EventSource holds one for as long as it streams: with six tabs streaming, a
// seventh could not even load the page. So a tab streams only while it holds one of
// MAX_STREAMS slots, Web Locks shared by every tab of the origin (and freed by the browser
// when a tab closes or crashes); a tab without one follows its answer by polling the API,
// which holds no connection between requests, and takes a slot as soon as one is free.

const MAX_STREAMS = 4;

/** A function that gives the slot back, or null when all are taken. */
export async function takeSlot() {
  if (!navigator.locks) return () => {}; // no Web Locks (not a secure context): no cap
  for (let i = 0; i < MAX_STREAMS; i += 1) {
    const release = await tryLock(`tidechat-stream-slot-${i}`);
    if (release) return release;
  }
  return null;
}

function tryLock(name) {
  return new Promise((resolve) => {
    navigator.locks.request(name, { ifAvailable: true }, (lock) => {
      if (!lock) {
        resolve(null);
        return undefined;
      }
      // The lock is held until the promise returned here settles.
      return new Promise((release) => resolve(release));
    });
  });
}
