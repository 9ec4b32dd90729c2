// fileutil.h — small filesystem helpers for checkpoints: whole-file read, atomic file write (temp file +
// fsync + rename), mkdir -p, rm -rf, and atomic publishing of a whole directory, so that a crash at any
// moment leaves either the old or the new checkpoint intact, never a half-written one.
#pragma once

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <string>
#include <system_error>

#include <csignal>
#include <cstdlib>

#include <fcntl.h>
#include <glob.h>
#include <sys/file.h>
#include <unistd.h>

#include "common.h"

inline std::string read_file(const std::string& path) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) fail("%s: cannot open (%s)", path.c_str(), strerror(errno));
    std::string bytes;
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0) bytes.append(buf, n);
    bool bad = ferror(f);
    int err = errno;
    fclose(f);
    if (bad) fail("%s: read error (%s)", path.c_str(), strerror(err));
    return bytes;
}

inline bool path_exists(const std::string& path) {
    std::error_code ec;
    return std::filesystem::exists(path, ec);
}

inline void make_dirs(const std::string& path) {
    std::error_code ec;
    std::filesystem::create_directories(path, ec);
    if (ec) fail("%s: cannot create directory (%s)", path.c_str(), ec.message().c_str());
    if (!std::filesystem::is_directory(path, ec)) fail("%s: exists and is not a directory", path.c_str());
}

// like rm -rf: a path that does not exist is not an error
inline void remove_tree(const std::string& path) {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (ec) fail("%s: cannot remove (%s)", path.c_str(), ec.message().c_str());
}

// The directory holding `path`, for fsync after a rename: a rename is durable only
// once the directory entry itself reaches the disk.
inline std::string parent_dir(const std::string& path) {
    std::string parent = std::filesystem::path(path).parent_path().string();
    return parent.empty() ? "." : parent;
}

inline void fsync_dir(const std::string& dir) {
    int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (fd < 0) fail("%s: cannot open directory to sync (%s)", dir.c_str(), strerror(errno));
    int rc = fsync(fd);
    int err = errno;
    close(fd);
    // some filesystems (e.g. certain network mounts) cannot sync directories; that is not data loss
    if (rc != 0 && err != EINVAL && err != ENOTSUP) fail("%s: cannot sync directory (%s)", dir.c_str(), strerror(err));
}

// Streaming atomic write, for files too large to build in memory first (weights):
// open writes to "<path>.tmp-<pid>", close flushes, fsyncs and renames it over path.
// On any error the temp file is removed and the target is left untouched.
inline FILE* atomic_file_open(const std::string& path, std::string& tmp_path) {
    tmp_path = path + strfmt(".tmp-%d", (int)getpid());
    FILE* f = fopen(tmp_path.c_str(), "wb");
    if (!f) fail("%s: cannot create (%s)", tmp_path.c_str(), strerror(errno));
    return f;
}

inline void atomic_file_abort(FILE* f, const std::string& tmp_path) {
    fclose(f);
    remove(tmp_path.c_str());
}

inline void atomic_file_write(FILE* f, const std::string& tmp_path, const void* data, size_t n) {
    if (n > 0 && fwrite(data, 1, n, f) != n) {
        int err = errno;
        atomic_file_abort(f, tmp_path);
        fail("%s: write error (%s)", tmp_path.c_str(), strerror(err));
    }
}

inline void atomic_file_close(FILE* f, const std::string& tmp_path, const std::string& path) {
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) {
        int err = errno;
        atomic_file_abort(f, tmp_path);
        fail("%s: write error (%s)", tmp_path.c_str(), strerror(err));
    }
    if (fclose(f) != 0) {
        int err = errno;
        remove(tmp_path.c_str());
        fail("%s: write error (%s)", tmp_path.c_str(), strerror(err));
    }
    if (rename(tmp_path.c_str(), path.c_str()) != 0) {
        int err = errno;
        remove(tmp_path.c_str());
        fail("%s: cannot rename %s into place (%s)", path.c_str(), tmp_path.c_str(), strerror(err));
    }
    fsync_dir(parent_dir(path));
}

inline void write_file_atomic(const std::string& path, const std::string& bytes) {
    std::string tmp;
    FILE* f = atomic_file_open(path, tmp);
    atomic_file_write(f, tmp, bytes.data(), bytes.size());
    atomic_file_close(f, tmp, path);
}

// ----------------------------------------------------------------------------
// Atomic directory publish, safe under a kill at any instruction. The caller writes everything into
// "<final_dir>.tmp" (atomic_dir_begin), each file fsynced, then atomic_dir_commit moves the previous version
// to "<final_dir>.old", the new one into place, and removes the old one. At every moment one complete
// version exists: final_dir, or between the two renames "<final_dir>.old" and the complete ".tmp".
// atomic_dir_recover (the writer, at its start) finishes or undoes what a kill interrupted and removes
// stale temporaries; atomic_dir_readable (readers, who must not race a writer's renames) names the complete
// version to read. DSV3_CRASH_AT=n in the environment kills the process at the commit's step n (1: before
// the first rename, 2: between the renames, 3: before removing the old version), for the tests.

inline void crash_point(int step) {
    const char* at = getenv("DSV3_CRASH_AT");
    if (at && atoi(at) == step) kill(getpid(), SIGKILL);
}

inline std::string strip_trailing_slashes(std::string path) {
    while (path.size() > 1 && path.back() == '/') path.pop_back();
    return path;
}

inline void atomic_dir_recover(const std::string& final_dir) {
    const std::string dst = strip_trailing_slashes(final_dir), tmp = dst + ".tmp", old = dst + ".old";
    if (!path_exists(dst) && path_exists(old)) {  // killed between the renames: the new version is complete
        if (rename(tmp.c_str(), dst.c_str()) != 0 && rename(old.c_str(), dst.c_str()) != 0)
            fail("%s: cannot recover the interrupted save from %s (%s)", dst.c_str(), old.c_str(), strerror(errno));
        fsync_dir(parent_dir(dst));
    }
    remove_tree(tmp);  // a save killed before its commit
    remove_tree(old);  // a commit killed before its cleanup
    // what earlier versions left under per-process names: "<dir>.tmp-<pid>" (partial), and
    // "<dir>.old-<pid>", the complete previous version, which is the checkpoint if dir is missing
    glob_t g;
    if (glob((dst + ".tmp-*").c_str(), 0, nullptr, &g) == 0)
        for (size_t i = 0; i < g.gl_pathc; i++) remove_tree(g.gl_pathv[i]);
    globfree(&g);
    if (glob((dst + ".old-*").c_str(), 0, nullptr, &g) == 0)
        for (size_t i = 0; i < g.gl_pathc; i++)
            if (path_exists(dst) || rename(g.gl_pathv[i], dst.c_str()) != 0) remove_tree(g.gl_pathv[i]);
    globfree(&g);
}

inline std::string atomic_dir_readable(const std::string& final_dir) {
    const std::string dst = strip_trailing_slashes(final_dir);
    return !path_exists(dst) && path_exists(dst + ".old") ? dst + ".old" : dst;
}

// Creates and returns "<final_dir>.tmp", empty.
inline std::string atomic_dir_begin(const std::string& final_dir) {
    std::string tmp = strip_trailing_slashes(final_dir) + ".tmp";
    remove_tree(tmp);
    make_dirs(tmp);
    return tmp;
}

inline void atomic_dir_commit(const std::string& tmp_dir, const std::string& final_dir) {
    const std::string dst = strip_trailing_slashes(final_dir), old = dst + ".old";
    fsync_dir(tmp_dir);
    crash_point(1);
    const bool had_old = path_exists(dst);
    if (had_old) {
        remove_tree(old);
        if (rename(dst.c_str(), old.c_str()) != 0)
            fail("%s: cannot move the previous version aside to %s (%s)", dst.c_str(), old.c_str(), strerror(errno));
    }
    crash_point(2);
    if (rename(tmp_dir.c_str(), dst.c_str()) != 0) {
        int err = errno;
        if (had_old) rename(old.c_str(), dst.c_str());  // put the last good version back
        fail("%s: cannot rename %s into place (%s)", dst.c_str(), tmp_dir.c_str(), strerror(err));
    }
    fsync_dir(parent_dir(dst));
    crash_point(3);
    if (had_old) remove_tree(old);
}

// Holds an exclusive lock on path (created if missing) until the process exits, however it exits; fails
// with `what` when another process holds it.
inline void lock_or_fail(const std::string& path, const char* what) {
    const int fd = open(path.c_str(), O_RDWR | O_CREAT, 0644);
    if (fd < 0) fail("%s: cannot create the lock file (%s)", path.c_str(), strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        close(fd);
        fail("%s", what);
    }
}
