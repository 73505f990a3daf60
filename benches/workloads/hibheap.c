/*
 * hibheap: the "big warm server" of the hibernation benchmark (benches/benches/hibernate.rs).
 * Built static by the benchmark with the host's gcc and put into its image.
 *
 *   hibheap MIB PORT WARMUP_MS
 *
 * Allocates MIB MiB and writes a pattern into every page (the warm caches a real service
 * builds), then spends WARMUP_MS milliseconds warming up before it listens (what a cold
 * start pays and a wake does not; modeled as waiting, like loading from a slow backend, so
 * that a cold start costs the same on a busy machine), then serves HTTP/1.0 on PORT, one
 * connection at a time: it reads the request head and answers
 *
 *     hits N sum S
 *
 * where N counts the requests this process has served (in-memory state that must continue
 * across a wake) and S is a checksum over one byte of every 64th page of the heap (cheap,
 * and wrong if the heap did not come back). `GET /full` checksums one byte of every page.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static uint64_t checksum(const unsigned char *heap, size_t len, size_t stride)
{
	uint64_t sum = 1469598103934665603ULL;
	for (size_t i = 0; i < len; i += stride)
		sum = (sum ^ heap[i]) * 1099511628211ULL;
	return sum;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: hibheap MIB PORT WARMUP_MS\n");
		return 2;
	}
	size_t len = (size_t)atol(argv[1]) << 20;
	int port = atoi(argv[2]);
	long warmup = atol(argv[3]);
	unsigned char *h = malloc(len);
	if (!h)
		die("malloc");
	for (size_t i = 0; i < len; i += PAGE)
		memset(h + i, (int)((i / PAGE * 31 + 7) & 0xff), PAGE);
	struct timespec ts = { warmup / 1000, (warmup % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;

	int l = socket(AF_INET, SOCK_STREAM, 0);
	if (l < 0)
		die("socket");
	int one = 1;
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in a;
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)port);
	a.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(l, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("bind");
	if (listen(l, 128) < 0)
		die("listen");
	signal(SIGPIPE, SIG_IGN);
	printf("listening on %d\n", port);
	fflush(stdout);

	unsigned long hits = 0;
	for (;;) {
		int c = accept(l, NULL, NULL);
		if (c < 0)
			continue;
		char req[1024];
		size_t got = 0;
		/* The request head: up to the empty line (or 1 KiB, or the client's end). */
		while (got < sizeof(req) - 1) {
			ssize_t n = read(c, req + got, sizeof(req) - 1 - got);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break;
			got += (size_t)n;
			req[got] = 0;
			if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n"))
				break;
		}
		req[got] = 0;
		int full = strncmp(req, "GET /full", 9) == 0;
		char body[128], out[256];
		int blen = snprintf(body, sizeof(body), "hits %lu sum %llu\n", ++hits,
				    (unsigned long long)checksum(h, len, full ? PAGE : 64 * PAGE));
		int n = snprintf(out, sizeof(out),
				 "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
				 "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
				 blen, body);
		if (write(c, out, (size_t)n) < 0) {
			/* the client left: nothing to do */
		}
		close(c);
	}
}
