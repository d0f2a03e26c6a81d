#!/usr/bin/env python3
"""A client of the object-store emulators that is not the machine's own (`object_store`): the
providers' official Python SDKs (azure-storage-blob, boto3) and GCS's JSON API over plain HTTP.
Tests use it to create buckets and to list and download what the machine wrote.

Usage: store_client.py <azure|s3|gcs> <command> [args]; the server is named by STORE_ENDPOINT
(and, for S3, STORE_KEY_ID / STORE_SECRET). Commands:
  setup                 (s3) create an IAM user whose key signs every later request (it may
                        not write to the bucket `readonly`); prints {"key_id", "secret"}
  create <bucket>       create a bucket (an Azure container)
  list <bucket>         print [{"name", "size", "content_type"}] of every object
  get <bucket> <key> <file>   download one object to <file>; prints {"content_type"}
  put-many <bucket> <prefix> <file> <count> <parallel> <rounds>
                        (benchmark baseline) upload <file> <count> times, <parallel> at a time,
                        <rounds> times over; prints {"seconds": [...]}, one wall time per round
"""

import json
import os
import sys
import urllib.parse
import urllib.request

AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def azure():
    from azure.storage.blob import BlobServiceClient

    conn = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={AZURITE_KEY};BlobEndpoint={os.environ['STORE_ENDPOINT']}/devstoreaccount1;"
    )
    return BlobServiceClient.from_connection_string(conn)


def s3():
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=os.environ["STORE_ENDPOINT"],
        aws_access_key_id=os.environ.get("STORE_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("STORE_SECRET", "testing"),
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def gcs(method, path, body=None, raw=False):
    url = os.environ["STORE_ENDPOINT"] + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req) as r:
        content = r.read()
        return content if raw else json.loads(content or b"null")


def put_many(provider, args):
    import time
    from concurrent.futures import ThreadPoolExecutor

    bucket, prefix, path, count, parallel, rounds = args[0], args[1], args[2], int(args[3]), int(args[4]), int(args[5])
    with open(path, "rb") as f:
        data = f.read()
    if provider == "azure":
        from azure.storage.blob import ContentSettings

        c = azure().get_container_client(bucket)

        def put(key):
            c.upload_blob(key, data, overwrite=True, content_settings=ContentSettings(content_type="image/png"))
    elif provider == "s3":
        c = s3()

        def put(key):
            c.put_object(Bucket=bucket, Key=key, Body=data, ContentType="image/png")
    else:
        sys.exit("put-many: azure or s3")
    seconds = []
    with ThreadPoolExecutor(parallel) as pool:
        for r in range(rounds):
            start = time.perf_counter()
            list(pool.map(put, [f"{prefix}/{r}/{i}.png" for i in range(count)]))
            seconds.append(time.perf_counter() - start)
    return {"seconds": seconds}


def main():
    provider, command, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    out = None
    if command == "put-many":
        print(json.dumps(put_many(provider, args)))
        return
    if provider == "azure":
        svc = azure()
        if command == "create":
            svc.create_container(args[0])
        elif command == "list":
            c = svc.get_container_client(args[0])
            out = [
                {"name": b.name, "size": b.size, "content_type": b.content_settings.content_type}
                for b in c.list_blobs()
            ]
        elif command == "get":
            b = svc.get_blob_client(args[0], args[1])
            d = b.download_blob()
            with open(args[2], "wb") as f:
                f.write(d.readall())
            out = {"content_type": d.properties.content_settings.content_type}
    elif provider == "s3":
        if command == "setup":
            import boto3

            iam = boto3.client(
                "iam",
                endpoint_url=os.environ["STORE_ENDPOINT"],
                aws_access_key_id="bootstrap",
                aws_secret_access_key="bootstrap",
                region_name="us-east-1",
            )
            iam.create_user(UserName="machine")
            iam.put_user_policy(
                UserName="machine",
                PolicyName="all",
                PolicyDocument=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {"Effect": "Allow", "Action": "*", "Resource": "*"},
                            # A bucket the machine's key may read but not write.
                            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::readonly/*"},
                        ],
                    }
                ),
            )
            k = iam.create_access_key(UserName="machine")["AccessKey"]
            out = {"key_id": k["AccessKeyId"], "secret": k["SecretAccessKey"]}
        else:
            c = s3()
            if command == "create":
                c.create_bucket(Bucket=args[0])
            elif command == "list":
                out = []
                for o in c.list_objects_v2(Bucket=args[0]).get("Contents", []):
                    h = c.head_object(Bucket=args[0], Key=o["Key"])
                    out.append({"name": o["Key"], "size": o["Size"], "content_type": h.get("ContentType")})
            elif command == "get":
                r = c.get_object(Bucket=args[0], Key=args[1])
                with open(args[2], "wb") as f:
                    f.write(r["Body"].read())
                out = {"content_type": r.get("ContentType")}
    elif provider == "gcs":
        if command == "create":
            gcs("POST", "/storage/v1/b?project=test", {"name": args[0]})
        elif command == "list":
            r = gcs("GET", f"/storage/v1/b/{args[0]}/o")
            out = [
                {"name": o["name"], "size": int(o["size"]), "content_type": o.get("contentType")}
                for o in r.get("items", [])
            ]
        elif command == "get":
            name = urllib.parse.quote(args[1], safe="")
            meta = gcs("GET", f"/storage/v1/b/{args[0]}/o/{name}")
            data = gcs("GET", f"/download/storage/v1/b/{args[0]}/o/{name}?alt=media", raw=True)
            with open(args[2], "wb") as f:
                f.write(data)
            out = {"content_type": meta.get("contentType")}
    else:
        sys.exit(f"unknown provider {provider}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
