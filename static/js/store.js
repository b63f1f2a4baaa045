// Past generations in IndexedDB: settings, result and image Blobs, kept across reloads.

const DB_NAME = "diffusion-cluster";
const STORE = "generations";
let opening = null;

function database() {
  opening ||= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => {
      request.result.createObjectStore(STORE, { keyPath: "id" }).createIndex("created", "created");
    };
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return opening;
}

async function transact(mode, work) {
  const db = await database();
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const request = work(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(request ? request.result : undefined);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

export const putEntry = (entry) => transact("readwrite", (store) => store.put(entry));
export const deleteEntry = (id) => transact("readwrite", (store) => store.delete(id));
export const clearEntries = () => transact("readwrite", (store) => store.clear());

/** Every entry, newest first. */
export async function allEntries() {
  const entries = await transact("readonly", (store) => store.index("created").getAll());
  return entries.reverse();
}
