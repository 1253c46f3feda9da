// The session browser; filled in by the next commit.
document.getElementById("app").textContent = "Threadline session browser";
